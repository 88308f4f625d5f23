"""Local SGD / periodic averaging (`parallel.strategy = "local_sgd"`, `parallel.average_every = H`;
Stich 2019, Lin et al. 2020 "Don't use large mini-batches, use local SGD").

Each dp rank steps its own replica on its own slice of the global batch, with the MEAN gradient of that
slice; every H updates the replicas average their parameters with one Allreduce (and their optimizer
state too with `parallel.average_optimizer_state = true`). With H = 1 and plain SGD this is synchronous
data parallel: mean_r(p - lr g_r) = p - lr mean_r(g_r), the global batch's mean gradient (equal up to
float32 rounding). Communication per step: one buffer every H steps instead of every step.

What stays collective every step is one scalar: the squared gradient norms are summed over dp_comm so
that every rank skips a non-finite step together (and the logged grad_norm is the ranks' RMS norm).
Clipping uses each rank's own norm. A checkpoint is an averaging point (parameters AND optimizer state),
so the file holds one model in the global format and a resumed run continues the same trajectory.
Evaluation uses the average of the replicas (computed into a separate copy, so it does not change the
training trajectory).
"""
from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from .. import checkpoint
from ..errors import ConfigError
from ..nn import MLP
from ..optim.clip import clip_and_check
from .base import StepResult, Strategy


class LocalSGD(Strategy):
    name = "local_sgd"

    def __init__(self, cfg, grid, global_batch: int):
        super().__init__(cfg, grid, global_batch)
        if cfg.backend.device != "cpu":
            raise ConfigError(f"{cfg.source}: parallel.strategy = \"local_sgd\" runs the optimizer on the host "
                              f"(backend.device = \"cpu\")")
        self.comm = grid.dp_comm
        self.N = self.comm.Get_size()
        self.local_batch = global_batch // grid.dp
        self.every = cfg.parallel.average_every
        self.in_sync = True           # replicas equal (start, restore, right after an average)
        self.eval_model: MLP | None = None  # the average of the replicas, for evaluation
        self.eval_averaged = False
        self.logged_bytes = self.logged_steps = 0

    def average(self, buf: np.ndarray) -> None:
        """buf <- mean over the dp replicas (one Allreduce, then one scaling pass)."""
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        buf *= buf.dtype.type(1.0 / self.N)
        self.logged_bytes += int(2 * (self.N - 1) / self.N * buf.nbytes)

    def average_replicas(self, state: bool) -> None:
        if self.N > 1:
            self.average(self.flat.data)
            if state:
                for a in self.opt_state.values():
                    self.average(a)
        self.in_sync = True

    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        loss_sum = self.model.loss_and_grad(x, labels, self.local_batch)  # this slice's MEAN gradient
        o = self.cfg.optimizer
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value)
        sq = norm * norm if finite else math.inf
        total = self.comm.allreduce(sq, op=MPI.SUM) if self.N > 1 else sq
        rms = math.sqrt(total / self.N) if math.isfinite(total) else total
        self.logged_steps += 1
        if not math.isfinite(total):  # some rank saw NaN/inf: every rank skips
            return StepResult(loss_sum, rms, False)
        self.opt.step(self.flat.data, self.flat.grad, self.opt_state, t, lr)
        self.in_sync = self.N == 1
        if t % self.every == 0:
            self.average_replicas(self.cfg.parallel.average_optimizer_state)
        return StepResult(loss_sum, rms, True)

    def prepare_evaluate(self) -> None:
        """Evaluate the average of the replicas, in a copy: training goes on from the local ones."""
        self.eval_averaged = not self.in_sync  # the same on every rank: it follows t
        if not self.eval_averaged:
            return
        if self.eval_model is None:
            m = self.cfg.model
            self.eval_model = MLP(m.layers, m.activation, m.loss, m.dtype, seed=self.cfg.run.seed, init=m.init)
        self.comm.Allreduce(self.flat.data, self.eval_model.flat.data, op=MPI.SUM)
        self.eval_model.flat.data *= self.dtype.type(1.0 / self.N)

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        return (self.eval_model if self.eval_averaged else self.model).evaluate(x, labels)

    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        """A checkpoint is an averaging point: parameters and optimizer state, so the file is one model."""
        self.average_replicas(state=True)
        return super().checkpoint_pieces()

    def restore(self, path: str, ckpt: checkpoint.Checkpoint) -> list[str]:
        notes = super().restore(path, ckpt)
        self.in_sync = True
        return notes

    def extra_metrics(self) -> dict:
        """bytes_sent: the averaging Allreduces (ring), per step since the last record."""
        out = dict(bytes_sent=self.logged_bytes // max(self.logged_steps, 1))
        self.logged_bytes = self.logged_steps = 0
        return out
