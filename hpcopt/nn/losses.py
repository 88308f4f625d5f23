"""Losses over the network's output: each returns the SUM of per-sample losses and writes the
gradient scaled by `scale` (1 / global batch), so the SUM over data-parallel ranks is the batch mean's.

Classification (integer labels (B,)): softmax_ce, and mse against one-hot targets.
Regression (float targets, B rows of T values, any per-sample shape flattened): mse, l1, huber
(delta 1) — each the MEAN over a sample's T values, as torch's *Loss(reduction="mean") per sample —
and rel_l2, the per-sample relative error ||out - y|| / ||y|| of the surrogate-model literature.
`score` returns the sums an evaluation adds over ranks (summable float64 vectors, see `scores`).
"""
from __future__ import annotations

import numpy as np

from ..kernels import cpu as K

REGRESSION = ("mse", "l1", "huber", "rel_l2")   # take float targets
CLASSIFICATION = ("softmax_ce", "mse")          # take integer labels (mse: one-hot targets)


_NO_ROWS = np.empty(0)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def softmax_ce(logits: np.ndarray, labels: np.ndarray, global_batch: int, dlogits: np.ndarray,
               rows: np.ndarray | None = None) -> float:
    """rows (B,) float64, given: each sample's loss is kept there (every loss here takes it)."""
    if rows is None:
        return K.softmax_ce(logits, labels, 1.0 / global_batch, dlogits)
    K.softmax_ce_rows(logits, labels, 1.0 / global_batch, dlogits, rows)
    return float(rows.sum())


def mse(out: np.ndarray, labels: np.ndarray, global_batch: int, dout: np.ndarray,
        rows: np.ndarray | None = None) -> float:
    """Integer labels: against one-hot targets, reported per sample as sum over outputs / C (torch's
    MSELoss mean). Float targets: the regression MSE, mean over each sample's values."""
    rows = _NO_ROWS if rows is None else rows
    if labels.dtype.kind == "f":
        return K.regression_loss(_rows(out), _rows(labels), K.LOSS_MSE, 1.0 / global_batch, _rows(dout), rows)
    C = out.shape[1]
    return K.mse_onehot(out, labels, 1.0 / (global_batch * C), dout, rows) / C


def _regression(code: int):
    def loss(out: np.ndarray, targets: np.ndarray, global_batch: int, dout: np.ndarray,
             rows: np.ndarray | None = None) -> float:
        return K.regression_loss(_rows(out), _rows(targets), code, 1.0 / global_batch, _rows(dout),
                                 _NO_ROWS if rows is None else rows)
    return loss


LOSSES = {"softmax_ce": softmax_ce, "mse": mse, "l1": _regression(K.LOSS_L1),
          "huber": _regression(K.LOSS_HUBER), "rel_l2": _regression(K.LOSS_REL_L2)}


def scores(out: np.ndarray, targets: np.ndarray, loss_sum: float) -> np.ndarray:
    """What an evaluation sums over ranks and chunks: classification [loss sum, number correct];
    regression [loss sum, sum of per-sample relative L2 errors, sum of squared errors, then per output
    value j the sums of y_j and of y_j²] (R² = 1 - SSE / sum_j (sum y_j² - (sum y_j)² / n))."""
    if targets.dtype.kind != "f":
        return np.array([loss_sum, K.count_correct(out, targets)], dtype=np.float64)
    o, t = _rows(out), _rows(targets)
    res = np.zeros(3 + 2 * o.shape[1])
    K.regression_stats(o, t, res)
    res[0] = loss_sum
    return res


def row_scores(out: np.ndarray, targets: np.ndarray, row_losses: np.ndarray) -> np.ndarray:
    """`scores` before the sum over rows: (B, len(scores)) float64, each row's terms (run.reproducible
    sums them exactly over ranks, so the test metrics do not depend on how the rows are split)."""
    B = out.shape[0]
    if targets.dtype.kind != "f":
        res = np.empty((B, 2))
        K.correct_rows(out, targets, res[:, 1])
    else:
        o, t = _rows(out), _rows(targets)
        res = np.empty((B, 3 + 2 * o.shape[1]))
        K.regression_rows(o, t, res)
    res[:, 0] = row_losses
    return res


def summarise(totals: np.ndarray, n: int, regression: bool) -> dict:
    """The test metrics from the summed `scores` of n samples."""
    if not regression:
        return dict(test_loss=totals[0] / n, test_acc=totals[1] / n)
    T = (len(totals) - 3) // 2
    sum_y, sum_y2 = totals[3:3 + T], totals[3 + T:3 + 2 * T]
    sst = float(np.sum(sum_y2 - sum_y * sum_y / n))
    sse = totals[2]
    return dict(test_loss=totals[0] / n, test_rel_l2=totals[1] / n,
                test_r2=1.0 - sse / sst if sst > 0 else float("nan"))
