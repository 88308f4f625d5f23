"""Local SGD / periodic averaging (`parallel.strategy = "local_sgd"`, `parallel.average_every = H`;
Stich 2019, Lin et al. 2020 "Don't use large mini-batches, use local SGD").

Each dp rank steps its own replica on its own slice of the global batch, with the MEAN gradient of that
slice; every H updates the replicas average their parameters with one Allreduce (and their optimizer
state too with `parallel.average_optimizer_state = true`). With H = 1 and plain SGD this is synchronous
data parallel: mean_r(p - lr g_r) = p - lr mean_r(g_r), the global batch's mean gradient (equal up to
float32 rounding). Communication per step: one buffer every H steps instead of every step.

What stays collective every step is one scalar: the update's `agree_comm` sums the squared gradient
norms over dp_comm so that every rank skips a non-finite step together (and the logged grad_norm is the
ranks' RMS norm); clipping uses each rank's own norm (update.py). A checkpoint is an averaging point
(parameters AND optimizer state), so the file holds one model in the global format and a resumed run
continues the same trajectory. Evaluation uses the average of the replicas (computed into a separate
copy, so it does not change the training trajectory).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from mpi4py import MPI

from .strategy import Exchange


class Averaging(Exchange):
    """The local-SGD exchange: nothing per step; the replicas averaged every `every` updates."""

    def __init__(self, flat, comm: MPI.Comm, every: int, average_state: bool,
                 state: Callable[[], dict[str, np.ndarray]], make_stage: Callable[[], object], buffers=None,
                 exact: bool = False):
        """state(): the optimizer state arrays (host); make_stage(): a fresh copy of the replica's Stage,
        into which evaluation averages the parameters. exact (run.reproducible): the sums are exact
        fixed-point sums (reprosum.allreduce_exact), the same bits whatever the MPI library's reduction
        order, rounded once."""
        super().__init__()
        self.flat, self.comm, self.exact = flat, comm, exact
        self.N = comm.Get_size()
        self.every, self.average_state = every, average_state
        self.state, self.make_stage = state, make_stage
        self.buffers = buffers        # FlatParams of batch norm's running statistics (averaged with the parameters)
        self.in_sync = True           # replicas equal (start, restore, right after an average)
        self.eval_stage = None        # the average of the replicas, for evaluation
        self.logged_bytes = self.logged_steps = 0

    def _sum(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst <- the sum of src over the dp replicas (one Allreduce; src may be dst)."""
        if self.exact:
            from .reprosum import allreduce_exact

            allreduce_exact(self.comm, src, out=dst)
        else:
            self.comm.Allreduce(MPI.IN_PLACE if src is dst else src, dst, op=MPI.SUM)

    def average(self, buf: np.ndarray) -> None:
        """buf <- mean over the dp replicas (one Allreduce, then one scaling pass)."""
        self._sum(buf, buf)
        buf *= buf.dtype.type(1.0 / self.N)
        self.logged_bytes += int(2 * (self.N - 1) / self.N * buf.nbytes)

    def average_replicas(self, state: bool) -> None:
        if self.N > 1:
            self.average(self.flat.data)
            if self.buffers is not None and self.buffers.size:
                self.average(self.buffers.data)
            if state:
                for a in self.state().values():
                    self.average(a)
        self.in_sync = True

    def reduce(self) -> None:
        self.logged_steps += 1

    def after_update(self, t: int, applied: bool) -> None:
        if not applied:
            return
        self.in_sync = self.N == 1
        if t % self.every == 0:
            self.average_replicas(self.average_state)

    def prepare_evaluate(self):
        """Evaluate the average of the replicas, in a copy: training goes on from the local ones."""
        if self.in_sync:  # the same on every rank: it follows t
            return None
        if self.eval_stage is None:
            self.eval_stage = self.make_stage()
        self._sum(self.flat.data, self.eval_stage.flat.data)
        self.eval_stage.flat.data *= self.flat.dtype.type(1.0 / self.N)
        if self.buffers is not None and self.buffers.size:
            self._sum(self.buffers.data, self.eval_stage.buffers.data)
            self.eval_stage.buffers.data *= 1.0 / self.N
        return self.eval_stage

    def before_checkpoint(self) -> None:
        """A checkpoint is an averaging point: parameters and optimizer state, so the file is one model."""
        self.average_replicas(state=True)

    def after_restore(self) -> None:
        self.in_sync = True

    def extra_metrics(self) -> dict:
        """bytes_sent: the averaging Allreduces (ring), per step since the last record."""
        out = dict(bytes_sent=self.logged_bytes // max(self.logged_steps, 1))
        self.logged_bytes = self.logged_steps = 0
        return out
