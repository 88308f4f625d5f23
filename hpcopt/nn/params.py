"""Flat parameter and gradient buffers with named per-layer views (DESIGN §3).

All parameters of a rank live in ONE contiguous 1-D array (`data`), gradients in a twin (`grad`) of
the same length; a layer's weight is a reshaped view into them. So a gradient bucket is a slice, an
optimizer step one kernel over the whole buffer, a ZeRO shard a slice, a checkpoint a few writes.
Tensors are laid out in the order given; the model passes BACKWARD order, so the gradients that
backward finishes first sit at the front and gradient buckets are contiguous slices from offset 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import memory


@dataclass(frozen=True)
class ParamSpec:
    layer: str          # e.g. "dense0"
    name: str           # e.g. "weight"
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class FlatParams:
    def __init__(self, specs: list[ParamSpec], dtype=np.float32, with_grad: bool = True):
        self.specs = list(specs)
        self.offsets: dict[str, int] = {}
        off = 0
        for s in self.specs:
            if s.key in self.offsets:
                raise ValueError(f"duplicate parameter {s.key}")
            self.offsets[s.key] = off
            off += s.size
        self.size = off
        self.dtype = np.dtype(dtype)
        self.data = memory.zeros(off, self.dtype)   # (n,) all parameters
        self.grad = memory.zeros(off, self.dtype) if with_grad else None   # (n,) their gradients

    def spec(self, key: str) -> ParamSpec:
        return self.specs[list(self.offsets).index(key)]

    def _view(self, buf: np.ndarray, key: str) -> np.ndarray:
        s = self.spec(key)
        off = self.offsets[key]
        return buf[off:off + s.size].reshape(s.shape)

    def param(self, key: str) -> np.ndarray:
        return self._view(self.data, key)

    def grad_of(self, key: str) -> np.ndarray:
        return self._view(self.grad, key)

    def view_of(self, buf: np.ndarray, key: str) -> np.ndarray:
        """The view of `key` in any buffer laid out like `data` (an optimizer state array, say)."""
        return self._view(buf, key)

    def segments(self) -> list[tuple[int, int]]:
        """(offset, length) of each tensor, in buffer order."""
        return [(self.offsets[s.key], s.size) for s in self.specs]

    def keys(self) -> list[str]:
        return [s.key for s in self.specs]
