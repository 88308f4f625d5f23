"""Asynchronous SGD with a parameter server (`parallel.strategy = "async"`; Dean et al. 2012, "Downpour").

dp rank 0 is the SERVER: it owns the parameters and the optimizer state (workers keep none) and applies
every gradient as soon as it arrives, one optimizer update each, in arrival order. Every other rank is a
WORKER: it computes the mean gradient of its slice of the global batch on the newest parameters it
has, pushes it (Isend) and goes on; the server answers each push with the parameters right after that
update (Isend), which the worker picks up (Irecv posted with the push) whenever they have arrived. The
server also trains on its own slice, between serving pushes. All messages are uppercase mpi4py on
preallocated buffers: a gradient or parameter buffer with a 16-byte header [version, finite].

    version    the server's update count; a worker's parameters carry the version they were sent at
    staleness  of an applied gradient: server updates between the version it was computed on and its
               own update (0 for the server's own gradients); `staleness_mean`/`staleness_max` are in
               metrics.jsonl, per logged interval
    parallel.max_staleness = s
               a worker computes a gradient only when at most s of its earlier pushes are unanswered
               (s = 0: its parameters include its previous gradient). It keeps s + 1 send and receive
               buffers. Since the Trainer agrees on checkpoints after every step, the staleness of an
               applied gradient is at most (s + 2) * N - 2 updates (N ranks).

No deadlock: every posted receive has exactly one matching send (the server posts one receive per worker
per step and every worker pushes once per step; each push gets one reply), and nobody waits on a message
whose sender waits on it. Before a checkpoint (and so at the end of the run) every in-flight message
completes: no request is left when MPI finalizes. Evaluation first broadcasts the server's parameters,
so every rank evaluates the same model. Updates land in arrival order: runs are not bitwise repeatable.
A non-finite gradient is dropped by the server (counted as `dropped`), so `optimizer.on_nonfinite =
"stop"` is not available here. On resume the server's update count is taken as steps * ranks.
"""
from __future__ import annotations

from collections import deque

import numpy as np
from mpi4py import MPI

from .. import checkpoint
from ..errors import ConfigError
from ..optim.clip import clip_and_check
from .base import StepResult, Strategy

SERVER = 0
GRAD, PARAMS = 501, 502   # message tags: worker -> server gradient, server -> worker parameters
HEADER_BYTES = 16         # int64 [version, finite] after the n values


class AsyncParameterServer(Strategy):
    name = "async"

    def __init__(self, cfg, grid, global_batch: int):
        src = cfg.source
        if cfg.backend.device != "cpu":
            raise ConfigError(f"{src}: parallel.strategy = \"async\" runs the optimizer on the host "
                              f"(backend.device = \"cpu\")")
        if cfg.optimizer.on_nonfinite == "stop":
            raise ConfigError(f"{src}: parallel.strategy = \"async\" drops non-finite gradients on the server; "
                              f"optimizer.on_nonfinite = \"stop\" is not available with it")
        if cfg.parallel.compression != "none":
            raise ConfigError(f"{src}: parallel.compression applies to parallel.strategy = \"data\"")
        super().__init__(cfg, grid, global_batch)
        self.comm = grid.dp_comm
        self.N, rank = self.comm.Get_size(), self.comm.Get_rank()
        self.is_server = rank == SERVER
        self.local_batch = global_batch // grid.dp
        self.max_staleness = cfg.parallel.max_staleness
        n, item = self.flat.size, self.dtype.itemsize
        self.n, self.width = n, n + HEADER_BYTES // item     # buffer: n values, then the header
        self.version = 0                                     # see the module docstring
        self.state_names = sorted(self.opt_state)
        new = lambda: np.zeros(self.width, dtype=self.dtype)  # noqa: E731
        self.eval_buf = new()
        self.logged_bytes = self.logged_steps = 0
        if self.is_server:
            self.workers = list(range(1, self.N))
            self.grad_in = [new() for _ in self.workers]      # one push per worker per step
            self.reply = [new() for _ in self.workers]
            self.recv_reqs = [MPI.REQUEST_NULL for _ in self.workers]
            self.send_reqs = [MPI.REQUEST_NULL for _ in self.workers]
            self.stale_sum = self.stale_max = self.stale_count = self.dropped = 0
        else:
            self.opt_state = {}                                # the server holds the optimizer state
            slots = self.max_staleness + 1
            self.send_buf = [new() for _ in range(slots)]
            self.recv_buf = [new() for _ in range(slots)]
            self.send_reqs = [MPI.REQUEST_NULL for _ in range(slots)]
            self.recv_reqs = [MPI.REQUEST_NULL for _ in range(slots)]
            self.pending: deque[int] = deque()                 # slots whose reply has not come, oldest first
            self.pushes = 0

    def header(self, buf: np.ndarray) -> np.ndarray:
        return buf[self.n:].view(np.int64)

    # -- server ------------------------------------------------------------------------------------
    def apply(self, grad: np.ndarray, version_used: int, finite: bool, lr: float) -> None:
        if not finite:
            self.dropped += 1
            return
        stale = self.version - version_used
        self.stale_sum, self.stale_max, self.stale_count = (self.stale_sum + stale, max(self.stale_max, stale),
                                                            self.stale_count + 1)
        self.version += 1
        self.opt.step(self.flat.data, grad, self.opt_state, self.version, lr)

    def serve_step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> StepResult:
        comm, n = self.comm, self.n
        for i, w in enumerate(self.workers):  # this step's push of every worker, whenever it comes
            self.recv_reqs[i] = comm.Irecv(self.grad_in[i], source=w, tag=GRAD)
        loss_sum = self.model.loss_and_grad(x, labels, self.local_batch)
        o = self.cfg.optimizer
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value)
        self.apply(self.flat.grad, self.version, finite, lr)
        for _ in self.workers:
            i = MPI.Request.Waitany(self.recv_reqs)
            version_used, ok = self.header(self.grad_in[i])
            self.apply(self.grad_in[i][:n], int(version_used), bool(ok), lr)
            self.send_reqs[i].Wait()  # the previous reply to this worker has left its buffer
            self.reply[i][:n] = self.flat.data
            self.header(self.reply[i])[:] = (self.version, 1)
            self.send_reqs[i] = comm.Isend(self.reply[i], dest=self.workers[i], tag=PARAMS)
            self.logged_bytes += self.reply[i].nbytes
        return StepResult(loss_sum, norm, True)

    # -- worker ------------------------------------------------------------------------------------
    def adopt(self, buf: np.ndarray) -> None:
        """Take parameters from a reply or broadcast if they are newer than the ones held."""
        v = int(self.header(buf)[0])
        if v > self.version:
            self.flat.data[...] = buf[:self.n]
            self.version = v

    def take_replies(self, keep: int) -> None:
        """Adopt the newest reply that has arrived; first wait until at most `keep` are unanswered."""
        newest = None
        while self.pending:
            slot = self.pending[0]
            if len(self.pending) > keep:
                self.recv_reqs[slot].Wait()
            elif not self.recv_reqs[slot].Test():
                break
            newest = self.pending.popleft()
        if newest is not None:
            self.adopt(self.recv_buf[newest])

    def work_step(self, x: np.ndarray, labels: np.ndarray) -> StepResult:
        self.take_replies(keep=self.max_staleness)
        loss_sum = self.model.loss_and_grad(x, labels, self.local_batch)  # this slice's MEAN gradient
        o = self.cfg.optimizer
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value)
        slot = self.pushes % len(self.send_buf)  # push (pushes - slots) used it; its reply has come
        self.send_reqs[slot].Wait()
        buf = self.send_buf[slot]
        buf[:self.n] = self.flat.grad
        self.header(buf)[:] = (self.version, int(finite))
        self.send_reqs[slot] = self.comm.Isend(buf, dest=SERVER, tag=GRAD)
        self.recv_reqs[slot] = self.comm.Irecv(self.recv_buf[slot], source=SERVER, tag=PARAMS)
        self.pending.append(slot)
        self.pushes += 1
        self.logged_bytes += buf.nbytes
        return StepResult(loss_sum, norm, True)

    # -- the contract ------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        self.logged_steps += 1
        return self.serve_step(x, labels, lr) if self.is_server else self.work_step(x, labels)

    def drain(self) -> None:
        """Complete every message in flight (both sides only wait for sends already posted)."""
        if not self.is_server:
            self.take_replies(keep=0)
        MPI.Request.Waitall(self.send_reqs)

    def prepare_evaluate(self) -> None:
        """Every rank evaluates the server's current parameters."""
        if self.is_server:
            self.eval_buf[:self.n] = self.flat.data
            self.header(self.eval_buf)[:] = (self.version, 1)
        self.comm.Bcast(self.eval_buf, root=SERVER)
        if not self.is_server:
            self.adopt(self.eval_buf)

    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        """The server writes every row of every dataset (it alone holds the optimizer state)."""
        self.drain()
        f = self.flat
        state = self.opt_state if self.is_server else {s: None for s in self.state_names}
        pieces = []
        for prefix, buf in [("params", f.data)] + [(f"optim/{s}", state[s]) for s in self.state_names]:
            for k in f.keys():
                shape = f.spec(k).shape
                rows = f.view_of(buf, k) if self.is_server else np.zeros((0,) + shape[1:], self.dtype)
                pieces.append(checkpoint.Piece(f"{prefix}/{k.replace('.', '/')}", shape, rows, 0))
        return pieces

    def restore(self, path: str, ckpt: checkpoint.Checkpoint) -> list[str]:
        notes = super().restore(path, ckpt)
        steps = int(ckpt.attrs.get("opt_steps", ckpt.attrs["step"]))
        writer_ranks = int(np.prod(ckpt.attrs.get("world", [1])))
        self.version = steps * writer_ranks if ckpt.attrs.get("strategy") == "async" else steps
        return notes

    def extra_metrics(self) -> dict:
        out = dict(bytes_sent=self.logged_bytes // max(self.logged_steps, 1))
        if self.is_server:
            out.update(staleness_mean=self.stale_sum / max(self.stale_count, 1), staleness_max=self.stale_max,
                       server_updates=self.version, dropped=self.dropped)
            self.stale_sum = self.stale_max = self.stale_count = 0
        self.logged_bytes = self.logged_steps = 0
        return out
