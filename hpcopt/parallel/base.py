"""What every parallel strategy provides to the Trainer (DESIGN §1).

A strategy owns this rank's part of the model (`model`, with its `flat` buffers), the optimizer and
its state, and runs one global step: forward/backward on this rank's data, gradient exchange,
clipping and the non-finite check, and the update. The Trainer owns the loop, data, metrics,
evaluation bookkeeping, signals and when to checkpoint; it never looks inside a strategy.

Contract (every method is called by every rank, in the same order):
    step(x, labels, t, lr) -> StepResult   x, labels: this rank's dp slice of the global batch;
                                           t: 1-based index of the update if applied; lr: after schedule
    evaluate(x, labels) -> (loss_sum, n_correct)   contributions that SUM over the world to the totals
    checkpoint_pieces() -> [checkpoint.Piece]      this rank's share of every global dataset
    restore(path, ckpt)                            global arrays -> this rank's buffers and state
    prepare_evaluate()                             before each evaluation (default: nothing)
    extra_metrics() -> dict                        at each logged step, merged into rank 0's record
                                                   (default: {})
`StepResult.loss_sum` is likewise this rank's contribution: summed over the world it is the global
batch's loss sum (a pipeline's last stage reports it, other stages 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .. import checkpoint, optim
from ..comm import Grid
from ..config import JobConfig
from ..errors import DataError
from ..nn import MLP
from ..optim.clip import clip_and_check


@dataclass
class StepResult:
    loss_sum: float     # this rank's contribution to the global batch's loss sum
    grad_norm: float    # global gradient L2 norm before clipping (inf/nan if non-finite)
    applied: bool       # False: non-finite gradient, update skipped on every rank


class Strategy:
    """Base: one full model replica per rank (data parallel); subclasses change the pieces."""

    name = "base"

    def __init__(self, cfg: JobConfig, grid: Grid, global_batch: int):
        self.cfg, self.grid, self.global_batch = cfg, grid, global_batch
        m = cfg.model
        self.model = MLP(m.layers, m.activation, m.loss, m.dtype, seed=cfg.run.seed, init=m.init)
        self.flat = self.model.flat
        self.device = cfg.backend.device
        self.opt = optim.build(cfg.optimizer, self.flat.segments(), device=self.device, source=cfg.source)
        self.opt_state = self.opt.init_state(self.flat.size)
        if self.device == "cuda":  # optimizer kernels on the GPU over device mirrors of the flat buffers
            from numba import cuda

            self.d_params, self.d_grad = cuda.to_device(self.flat.data), cuda.device_array_like(self.flat.grad)

    @property
    def dtype(self) -> np.dtype:
        return self.model.dtype

    # -- one step ------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        raise NotImplementedError

    def clip_and_update(self, t: int, lr: float, norm_comm: MPI.Comm | None = None) -> tuple[float, bool]:
        """Clip the (already exchanged) gradients, check them, update. norm_comm: where the squared
        norm must be summed when each rank holds only part of the gradient (None: it holds all)."""
        o = self.cfg.optimizer
        allreduce = None if norm_comm is None or norm_comm.Get_size() == 1 else (
            lambda v: norm_comm.allreduce(v, op=MPI.SUM))
        if self.device == "cuda":  # the network runs on the host: its gradient goes over, parameters back
            self.d_grad.copy_to_device(self.flat.grad)
            norm, finite = clip_and_check(self.d_grad, o.clip_norm, o.clip_value, allreduce)
            if finite:
                self.opt.step(self.d_params, self.d_grad, self.opt_state, t, lr)
                self.d_params.copy_to_host(self.flat.data)
            return norm, finite
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value, allreduce)
        if finite:
            self.opt.step(self.flat.data, self.flat.grad, self.opt_state, t, lr)
        return norm, finite

    def host_state(self) -> dict[str, np.ndarray]:
        """The optimizer state as host arrays (copied from the GPU when backend.device = "cuda")."""
        if self.device == "cuda":
            return {s: a.copy_to_host() for s, a in self.opt_state.items()}
        return self.opt_state

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        return self.model.evaluate(x, labels)

    def prepare_evaluate(self) -> None:
        """Collective, once before each evaluation: make the model that `evaluate` uses consistent
        (local SGD averages the replicas, async SGD pulls the server's parameters). Default: nothing."""

    def extra_metrics(self) -> dict:
        """Strategy-specific figures for the metrics record of a logged step (bytes sent per step,
        staleness, ...). Called on every rank at the same steps; rank 0's dict is logged."""
        return {}

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        """Replicas hold the same tensors and split each one's rows: every byte is written once."""
        f, g = self.flat, self.grid
        arrays = [("params", f.data)] + [(f"optim/{s}", a) for s, a in sorted(self.host_state().items())]
        pieces = []
        for prefix, buf in arrays:
            for k in f.keys():
                full = f.view_of(buf, k)
                lo, hi = checkpoint.rows_of(full.shape[0], g.dp_rank, g.dp)
                pieces.append(checkpoint.Piece(f"{prefix}/{k.replace('.', '/')}", full.shape, full[lo:hi], lo))
        return pieces

    def restore_params(self, path: str, ckpt: checkpoint.Checkpoint) -> bool:
        """Check the file holds every dataset this model needs, load the global parameters into
        self.flat; True when the file's optimizer state belongs to this optimizer (so it loads too)."""
        f = self.flat
        same_optimizer = ckpt.attrs.get("optimizer") == self.opt.name
        checkpoint.check_complete(path, ckpt, f.keys(), list(self.opt_state) if same_optimizer else [])
        for k in f.keys():
            if ckpt.params[k].shape != f.param(k).shape:
                raise DataError(f"{path}: /params/{k.replace('.', '/')} has shape {ckpt.params[k].shape}, "
                                f"the model needs {f.param(k).shape}")
            f.param(k)[...] = ckpt.params[k]
        return same_optimizer

    def restore(self, path: str, ckpt: checkpoint.Checkpoint) -> list[str]:
        """Load global arrays into this rank's buffers. Returns notes for the user."""
        f = self.flat
        same_optimizer = self.restore_params(path, ckpt)
        if self.device == "cuda":
            self.d_params.copy_to_device(f.data)
        if same_optimizer:
            for s, a in self.host_state().items():
                for k in f.keys():
                    f.view_of(a, k)[...] = ckpt.optim[s][k]
                if self.device == "cuda":
                    self.opt_state[s].copy_to_device(a)
            return []
        return [f"{path}: optimizer state of {ckpt.attrs.get('optimizer')} not loaded into "
                f"{self.opt.name}: it starts fresh"]
