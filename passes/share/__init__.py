"""Weight-sharing passes: merge identical or similar weights, cluster weights to a codebook; clip weights."""

from .clip import ClipWeightsPass
from .cluster import ClusterWeightsPass
from .identical import MergeIdenticalWeightsPass
from .similar import MergeSimilarWeightsPass

__all__ = ["ClipWeightsPass", "ClusterWeightsPass", "MergeIdenticalWeightsPass", "MergeSimilarWeightsPass"]
