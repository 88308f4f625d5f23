"""The MLP: the whole model as one Stage (every layer, none split), for one process and for replicas."""
from __future__ import annotations

from typing import Sequence

from .stage import Stage


class MLP(Stage):
    """widths = [n_in, hidden..., n_out]; `activation` between layers, none after the last."""

    def __init__(self, widths: Sequence[int], activation: str = "relu", loss: str = "softmax_ce",
                 dtype: str = "float32", seed: int = 0, init: str = "he"):
        super().__init__(widths, 0, len(widths) - 1, activation, loss, dtype, seed, init)
