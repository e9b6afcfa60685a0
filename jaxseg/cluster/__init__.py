"""k-means: batched, vmappable, masked, and streamed at dataset scale."""

from jaxseg.cluster.kmeans import METRICS
from jaxseg.cluster.kmeans import KMeansResult
from jaxseg.cluster.kmeans import assign
from jaxseg.cluster.kmeans import assign_with_distance
from jaxseg.cluster.kmeans import distances
from jaxseg.cluster.kmeans import kmeans
from jaxseg.cluster.stream import ReservoirState
from jaxseg.cluster.stream import assign_chunks
from jaxseg.cluster.stream import reservoir_add
from jaxseg.cluster.stream import reservoir_init
from jaxseg.cluster.stream import reservoir_kmeans
from jaxseg.cluster.stream import reservoir_sample
