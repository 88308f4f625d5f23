"""Data sets as HDF5 files, bundled generators, and the deterministic sharded loader (DESIGN §6)."""
from .datasets import DataInfo, inspect, make_digits, make_synthetic
from .loader import ShardedLoader

__all__ = ["DataInfo", "inspect", "make_digits", "make_synthetic", "ShardedLoader"]
