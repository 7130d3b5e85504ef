"""Weight-sharing passes: merge identical or similar weights, cluster weights to a codebook."""

from .identical import MergeIdenticalWeightsPass

__all__ = ["MergeIdenticalWeightsPass"]
