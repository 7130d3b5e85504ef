"""Weight-sharing passes: merge identical or similar weights, cluster weights to a codebook."""

from .cluster import ClusterWeightsPass
from .identical import MergeIdenticalWeightsPass

__all__ = ["ClusterWeightsPass", "MergeIdenticalWeightsPass"]
