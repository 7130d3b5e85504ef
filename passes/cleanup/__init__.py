"""Cleanup passes (lossless): lift and fold constants, rewrite patterns, remove dead code."""

from .common import (
    EliminateCommonSubexpressionsPass,
    EliminateIdentitiesPass,
    InferShapesPass,
    RemoveUnusedPass,
    SortTopologicallyPass,
)
from .fold import FoldConstantsPass
from .lift import LiftConstantsPass
from .rewrite import RewritePatternsPass

__all__ = [
    "EliminateCommonSubexpressionsPass",
    "EliminateIdentitiesPass",
    "FoldConstantsPass",
    "InferShapesPass",
    "LiftConstantsPass",
    "RemoveUnusedPass",
    "RewritePatternsPass",
    "SortTopologicallyPass",
]
