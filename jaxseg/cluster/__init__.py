"""k-means: batched, vmappable, masked, and streamed at dataset scale."""

from jaxseg.cluster.lloyd import METRICS
from jaxseg.cluster.lloyd import KMeansResult
from jaxseg.cluster.lloyd import assign
from jaxseg.cluster.lloyd import assign_with_distance
from jaxseg.cluster.lloyd import distances
from jaxseg.cluster.lloyd import kmeans
from jaxseg.cluster.stream import ReservoirState
from jaxseg.cluster.stream import assign_chunks
from jaxseg.cluster.stream import reservoir_add
from jaxseg.cluster.stream import reservoir_add_donated
from jaxseg.cluster.stream import reservoir_init
from jaxseg.cluster.stream import reservoir_kmeans
from jaxseg.cluster.stream import reservoir_sample
from jaxseg.cluster.stream import reservoir_sorted
