"""Layers over one flat parameter buffer (DESIGN §3)."""
from .model import MLP
from .params import FlatParams, ParamSpec

__all__ = ["MLP", "FlatParams", "ParamSpec"]
