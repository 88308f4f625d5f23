"""Data parallel: each dp rank computes gradients on its slice of the global batch; one Allreduce
over the flat gradient buffer sums them. The loss gradient is already scaled by 1 / global batch,
so the sum IS the mean: averaging costs no extra pass."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI


class DataParallel:
    def __init__(self, dp_comm: MPI.Comm):
        self.comm = dp_comm

    def sync_grads(self, grad: np.ndarray) -> None:
        """grad (n,): this rank's gradient in, the sum over dp replicas out (in place)."""
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
