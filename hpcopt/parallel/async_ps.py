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

from .strategy import Exchange, StepResult, Strategy

SERVER = 0
GRAD, PARAMS = 501, 502   # message tags: worker -> server gradient, server -> worker parameters
HEADER_BYTES = 16         # int64 [version, finite] after the n values


class AsyncParameterServer(Strategy):
    """A strategy of its own policy: the server applies many updates per step, a worker none. Composed
    like the others (a whole-model partition, a Sequential executor on the MEAN gradient of this rank's
    slice, the one update path: `clip` on every rank, `step_with` on the server); its step is its own."""

    def __init__(self, partition, executor, update, comm: MPI.Comm, max_staleness: int):
        super().__init__("async", partition, executor, Exchange(), update)
        self.comm = comm
        self.N, rank = comm.Get_size(), comm.Get_rank()
        self.is_server = rank == SERVER
        # the server alone holds the optimizer state and writes the checkpoint (every rank loads it)
        self.param_blocks = partition.blocks(replicas=1, replica=0, writer=self.is_server)
        self.state_blocks = self.param_blocks
        self.buffer_blocks = partition.buffer_blocks(replicas=1, replica=0, writer=self.is_server)
        self.max_staleness = max_staleness
        n, item = self.flat.size, self.dtype.itemsize
        self.n, self.width = n, n + HEADER_BYTES // item     # buffer: n values, then the header
        self.version = 0                                     # see the module docstring
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
    def apply(self, grad: np.ndarray | None, version_used: int, finite: bool, lr: float) -> None:
        """One update with a (clipped) gradient: the server's own (None) or a worker's."""
        if not finite:
            self.dropped += 1
            return
        stale = self.version - version_used
        self.stale_sum, self.stale_max, self.stale_count = (self.stale_sum + stale, max(self.stale_max, stale),
                                                            self.stale_count + 1)
        self.version += 1
        self.update.step_with(grad, self.version, lr)

    def serve_step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        comm, n = self.comm, self.n
        for i, w in enumerate(self.workers):  # this step's push of every worker, whenever it comes
            self.recv_reqs[i] = comm.Irecv(self.grad_in[i], source=w, tag=GRAD)
        loss_sum = self.executor.run(x, labels, None, t)
        norm, finite = self.update.clip()
        self.apply(None, self.version, finite, lr)
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

    def work_step(self, x: np.ndarray, labels: np.ndarray, t: int) -> StepResult:
        self.take_replies(keep=self.max_staleness)
        loss_sum = self.executor.run(x, labels, None, t)  # this slice's MEAN gradient
        norm, finite = self.update.clip()
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
        return self.serve_step(x, labels, t, lr) if self.is_server else self.work_step(x, labels, t)

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
        if self.stage.buffers.size:   # batch norm's running statistics: the server's (from its own slices)
            self.comm.Bcast(self.stage.buffers.data, root=SERVER)

    def checkpoint_pieces(self):
        """The server writes every row of every dataset (it alone holds the optimizer state)."""
        self.drain()
        return super().checkpoint_pieces()

    def restore(self, path: str, ckpt, load_state: bool = True) -> list[str]:
        notes = super().restore(path, ckpt, load_state)
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
