"""Data parallel: each dp rank computes gradients on its slice of the global batch; one Allreduce
over the flat gradient buffer sums them. The loss gradient is already scaled by 1 / global batch,
so the sum IS the mean: averaging costs no extra pass."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .base import StepResult, Strategy


class DataParallel(Strategy):
    name = "data"

    def sync_grads(self, grad: np.ndarray) -> None:
        """grad (n,): this rank's gradient in, the sum over dp replicas out (in place)."""
        comm = self.grid.dp_comm
        if comm.Get_size() > 1:
            comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)

    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        loss_sum = self.model.loss_and_grad(x, labels, self.global_batch)
        self.sync_grads(self.flat.grad)
        norm, finite = self.clip_and_update(t, lr)  # every replica holds the whole summed gradient
        return StepResult(loss_sum, norm, finite)
