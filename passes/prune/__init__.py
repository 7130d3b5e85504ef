"""Pruning passes: structured channel removal, unstructured weight zeroing, and cleanup of what pruning left dead."""

from .channels import PruneChannelsPass
from .drop import DropPrunedInitializersPass
from .weights import PruneWeightsPass

__all__ = ["DropPrunedInitializersPass", "PruneChannelsPass", "PruneWeightsPass"]
