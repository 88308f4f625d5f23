"""Losses over the network's output: each returns the SUM of per-sample losses and writes the
gradient scaled by `scale` (1 / global batch, or 1 / (global batch * classes) for mse)."""
from __future__ import annotations

import numpy as np

from ..kernels import cpu as K


def softmax_ce(logits: np.ndarray, labels: np.ndarray, global_batch: int, dlogits: np.ndarray) -> float:
    return K.softmax_ce(logits, labels, 1.0 / global_batch, dlogits)


def mse(out: np.ndarray, labels: np.ndarray, global_batch: int, dout: np.ndarray) -> float:
    """Reported per sample as sum over outputs / C, so the logged loss is torch's MSELoss (mean)."""
    C = out.shape[1]
    return K.mse_onehot(out, labels, 1.0 / (global_batch * C), dout) / C


LOSSES = {"softmax_ce": softmax_ce, "mse": mse}
