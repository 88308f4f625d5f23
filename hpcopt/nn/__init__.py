"""Layers over one flat parameter buffer (DESIGN §3)."""
from .model import MLP, Model
from .params import FlatParams, ParamSpec

__all__ = ["MLP", "Model", "FlatParams", "ParamSpec"]
