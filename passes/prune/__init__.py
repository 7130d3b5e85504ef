"""Pruning passes: structured channel removal, unstructured weight zeroing, and cleanup of what pruning left dead."""

from .channels import PruneChannelsPass

__all__ = ["PruneChannelsPass"]
