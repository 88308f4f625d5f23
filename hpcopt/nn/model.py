"""The whole model in one process: the MLP of widths, or any model.layer list (a Spec)."""
from __future__ import annotations

from typing import Sequence

from .stage import Stage


class MLP(Stage):
    """widths = [n_in, hidden..., n_out]; `activation` between layers, none after the last."""

    def __init__(self, widths: Sequence[int], activation: str = "relu", loss: str = "softmax_ce",
                 dtype: str = "float32", seed: int = 0, init: str = "he"):
        super().__init__(widths, 0, len(widths) - 1, activation, loss, dtype, seed, init)


class Model(Stage):
    """The whole model of a Spec in one process (every unit, none split)."""

    def __init__(self, spec, loss: str = "softmax_ce", dtype: str = "float32", seed: int = 0, init: str = "he"):
        super().__init__(spec, 0, len(spec.units), "relu", loss, dtype, seed, init)

