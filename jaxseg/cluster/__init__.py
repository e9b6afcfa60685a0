"""k-means: batched, vmappable, masked, and streamed at dataset scale."""

from jaxseg.cluster.kmeans import METRICS
from jaxseg.cluster.kmeans import KMeansResult
from jaxseg.cluster.kmeans import assign
from jaxseg.cluster.kmeans import assign_with_distance
from jaxseg.cluster.kmeans import distances
from jaxseg.cluster.kmeans import kmeans
