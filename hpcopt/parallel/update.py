"""apply_update: clip -> non-finite check -> optimizer step, written ONCE for every layout (DESIGN §1).

A layout hands the `Update` the views it updates and says where the gradient norm is summed:
    data, local_sgd, async    the whole flat buffer of a replica (the norm is this rank's)
    ZeRO-1                    this rank's shard of the parameters and of the summed gradient; the
                              squared norm is summed over dp_comm (each rank holds 1/N of the gradient)
    pipeline, tensor, hybrid  this rank's partition; the squared norm is summed over tp_comm, then
                              pp_comm, with the tensors every tp rank holds alike counted on tp rank 0
                              only (`not_counted`: the ranges this rank holds but another counts)
The update is applied only when the GLOBAL norm is finite, so every rank makes the same decision;
a non-finite step leaves parameters and optimizer state untouched (optimizer.on_nonfinite).

    per step:  [device mirror: gradient to the GPU] -> clip_and_check (one read pass for the squared
               norm, the sum over the named communicators, one write pass if clipping) -> finite?
               -> optimizer kernel over (params, grads, state) -> [parameters back to the host]

local SGD's policy (each replica clips with its own norm, all skip together) is `agree_comm`: the
ranks' squared norms are summed there to decide, and the norm reported is their RMS. The parameter
server calls `clip` on workers (they push clipped gradients) and `step_with` for received gradients.
`backend.device = "cuda"`: the optimizer kernels run on device mirrors of params and grads; the network
runs on the host, so each step's gradient goes over and the parameters come back.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from mpi4py import MPI

from .. import optim
from ..errors import ConfigError
from ..kernels import optim_cpu
from ..optim.clip import clip_and_check


class Update:
    """The optimizer, its state and the one update path over the views `params`/`grads` (same length)."""

    def __init__(self, cfg, params: np.ndarray, grads: np.ndarray, segments: list[tuple[int, int]], *,
                 device: str = "cpu", norm_comms: tuple[MPI.Comm, ...] = (),
                 not_counted: list[tuple[int, int]] = (), agree_comm: MPI.Comm | None = None,
                 keeps_state: bool = True, source: str = "job config", sum_sq=None):
        """cfg: the OptimizerConfig. segments: (offset, length) of each tensor in params (for optimizers
        with per-tensor norms). norm_comms: where the squared norm is summed, in order (only those with
        more than one rank). not_counted: (offset, length) ranges of grads left out of this rank's share
        of the norm. keeps_state=False: no optimizer state (a parameter-server worker)."""
        self.cfg, self.params, self.grads, self.device = cfg, params, grads, device
        self.sum_sq = sum_sq   # clip_and_check's squared sums, when not its own (run.reproducible)
        self.opt = optim.build(cfg, segments, device=device, source=source)
        self.state: dict[str, Any] = self.opt.init_state(len(params)) if keeps_state else {}
        self.norm_comms = tuple(c for c in norm_comms if c.Get_size() > 1)
        self.not_counted = list(not_counted)
        self.agree_comm = agree_comm if agree_comm is not None and agree_comm.Get_size() > 1 else None
        if device == "cuda":
            from numba import cuda

            self.d_params, self.d_grads = cuda.to_device(params), cuda.device_array_like(grads)

    @property
    def name(self) -> str:
        return self.opt.name

    def set_optimizer(self, cfg) -> None:
        """Other hyperparameters for the same optimizer (population-based training); the state is kept,
        so its arrays must be the same ones."""
        opt = optim.build(cfg, self.opt.segments, device=self.device, source="sweep")
        if opt.name != self.opt.name or set(opt.state_spec()) != set(self.opt.state_spec()):
            raise ConfigError(f"optimizer {opt.name} ({', '.join(sorted(opt.state_spec()))}) cannot take over the "
                              f"state of {self.opt.name} ({', '.join(sorted(self.opt.state_spec()))})")
        self.cfg, self.opt = cfg, opt

    @property
    def state_names(self) -> list[str]:
        """The state arrays this optimizer keeps (on every rank, also where keeps_state=False)."""
        return sorted(self.opt.state_spec())

    # -- the one path ---------------------------------------------------------------------------------
    def apply(self, t: int, lr: float) -> tuple[float, bool]:
        """Clip the (already exchanged) gradients, check them, update. Returns (the global gradient
        norm before clipping, whether the update was applied). t: 1-based update count."""
        norm, finite = self.clip()
        if self.agree_comm is not None:  # local SGD: every replica skips if any saw NaN/inf
            total = self.agree_comm.allreduce(norm * norm if finite else math.inf, op=MPI.SUM)
            finite = math.isfinite(total)
            norm = math.sqrt(total / self.agree_comm.Get_size()) if finite else total
        if finite:
            self.step_with(None, t, lr)
        return norm, finite

    def clip(self) -> tuple[float, bool]:
        """Clip in place and return (norm before clipping, finite): the norm summed where the layout
        says. On the GPU path the host gradient first goes to the device mirror."""
        o = self.cfg
        grads = self.grads
        if self.device == "cuda":
            self.d_grads.copy_to_device(self.grads)
            grads = self.d_grads
        return clip_and_check(grads, o.clip_norm, o.clip_value, self._norm_sum(), self.sum_sq)

    def step_with(self, grads: np.ndarray | None, t: int, lr: float) -> None:
        """The optimizer kernel over params with `grads` (None: this update's own, already clipped)."""
        if self.device == "cuda":
            if grads is not None:
                self.d_grads.copy_to_device(grads)
            self.opt.step(self.d_params, self.d_grads, self.state, t, lr)
            self.d_params.copy_to_host(self.params)
            return
        self.opt.step(self.params, self.grads if grads is None else grads, self.state, t, lr)

    def _norm_sum(self):
        """clip_and_check's allreduce_sum: this rank's squared norm -> the layout's, each tensor once.
        It is called once, or twice (the sum after clip_value) when clip_value and clip_norm are both on."""
        if not self.norm_comms:
            return None
        own: list[float] = []  # this rank's share of not-counted tensors, in clip_and_check's call order
        if self.not_counted:
            sq = sq_clipped = 0.0
            clip_value = self.cfg.clip_value
            for off, n in self.not_counted:
                part = self.grads[off:off + n]
                s, c = (optim_cpu.sum_sq_clipped(part, clip_value) if clip_value > 0
                        else (optim_cpu.sum_sq(part),) * 2)
                sq, sq_clipped = sq + s, sq_clipped + c
            own = [sq, sq_clipped]

        def total(v: float) -> float:
            if own:
                v -= own.pop(0)
            for c in self.norm_comms:
                v = c.allreduce(v, op=MPI.SUM)
            return v
        return total

    # -- device mirrors and restore ----------------------------------------------------------------------
    def host_state(self) -> dict[str, np.ndarray]:
        """The optimizer state as host arrays (copied from the GPU when backend.device = "cuda")."""
        if self.device == "cuda":
            return {s: a.copy_to_host() for s, a in self.state.items()}
        return self.state

    def params_changed(self) -> None:
        """The host parameters were overwritten (a restore): refresh the device mirror."""
        if self.device == "cuda":
            self.d_params.copy_to_device(self.params)

    def load_state(self, host: dict[str, np.ndarray]) -> None:
        """Host arrays from host_state(), filled by a restore, become the state (on the device too)."""
        if self.device == "cuda":
            for s, a in host.items():
                self.state[s].copy_to_device(a)
        else:
            for s, a in host.items():
                if a is not self.state[s]:
                    self.state[s][...] = a
