"""Layers of kcengine (``kcengine.nn.ClusteredConv2d``); re-exports only."""
from .conv.fuse import fuse_for_inference
from .conv.module import ClusteredConv2d

__all__ = ["ClusteredConv2d", "fuse_for_inference"]
