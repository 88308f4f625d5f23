"""Tensor parallel Dense layers on `tp_comm` (Megatron-style pairs): which layer is split how.

Layers pair up: dense0 COLUMN, dense1 ROW, dense2 COLUMN, dense3 ROW, ...; an odd last layer stays
whole (FULL) on every tp rank. In a pair, the column layer's output columns and the row layer's input
rows are split over tp, so the hidden activation never travels: the row layer's partial products are
summed by ONE Allreduce forward, the column layer's input gradient by ONE Allreduce backward (none for
dense0, which needs no input gradient). Widths between the two layers of a pair must divide by tp
(config.validate_layout).

    tensor-parallel MLP block, x (B, n) replicated on the tp ranks:
      h_r = act(x @ W1[:, r] + b1[r])       (B, m/tp)   column-parallel, no communication
      y   = act(sum_r h_r @ W2[r, :] + b2)  (B, k)      row-parallel: Allreduce over tp_comm
    backward: dW2[r] = h_r.T dy; dh_r = dy W2[r].T; dW1[:, r] = x.T dz_r; dx = sum_r dz_r W1[:, r].T (Allreduce)

The blocks themselves are nn/layers.py's Dense (split = COLUMN / ROW); the partition that holds them,
its sums over tp and its place in the global tensors are parallel/partition.py's; the global norm
that counts each tensor once is parallel/update.py's.
"""
from __future__ import annotations

from ..nn.layers import COLUMN, FULL, ROW


def layer_splits(n_layers: int, tp: int) -> list[str]:
    """How each layer is sharded over tp: column/row pairs, an odd last layer whole."""
    if tp == 1:
        return [FULL] * n_layers
    return [COLUMN if i % 2 == 0 and i + 1 < n_layers else ROW if i % 2 == 1 else FULL for i in range(n_layers)]
