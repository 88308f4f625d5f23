"""Tensor parallel Dense layers on `tp_comm` (Megatron-style pairs), and what every model-parallel
layout shares: this rank's partition of the model, its gradient exchange, the global norm, and
checkpoints in the global format.

Layers pair up: dense0 COLUMN, dense1 ROW, dense2 COLUMN, dense3 ROW, ...; an odd last layer stays
whole (FULL) on every tp rank. In a pair, the column layer's output columns and the row layer's input
rows are split over tp, so the hidden activation never travels: the row layer's partial products are
summed by ONE Allreduce forward, the column layer's input gradient by ONE Allreduce backward (none for
dense0, which needs no input gradient). Widths between the two layers of a pair must divide by tp.

    tensor-parallel MLP block, x (B, n) replicated on the tp ranks:
      h_r = act(x @ W1[:, r] + b1[r])       (B, m/tp)   column-parallel, no communication
      y   = act(sum_r h_r @ W2[r, :] + b2)  (B, k)      row-parallel: Allreduce over tp_comm
    backward: dW2[r] = h_r.T dy; dh_r = dy W2[r].T; dW1[:, r] = x.T dz_r; dx = sum_r dz_r W1[:, r].T (Allreduce)

Every rank of a partition's dp replicas holds the same shards; their gradients are summed (the loss is
already scaled by 1 / global batch) over `dp_comm` by data parallel's bucketed exchange, its buckets
started during the last micro-batch's backward (BucketedExchange, data.py). The gradient norm
for clipping is the GLOBAL one: each rank's squared norm, with tensors that every tp rank holds
(FULL layers, ROW biases) counted on tp rank 0 only, summed over tp_comm and then pp_comm.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import checkpoint, optim
from ..comm import Grid
from ..config import JobConfig
from ..errors import ConfigError, DataError
from ..kernels import optim_cpu
from ..nn.stage import COLUMN, FULL, ROW, Stage
from .base import StepResult, Strategy
from .data import BucketedExchange


def layer_splits(n_layers: int, tp: int) -> list[str]:
    """How each layer is sharded over tp: column/row pairs, an odd last layer whole."""
    if tp == 1:
        return [FULL] * n_layers
    return [COLUMN if i % 2 == 0 and i + 1 < n_layers else ROW if i % 2 == 1 else FULL for i in range(n_layers)]


def global_specs(widths: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(key, global shape) of every tensor of the whole model, in the unsplit model's buffer order."""
    out = []
    for i in reversed(range(len(widths) - 1)):
        out += [(f"dense{i}.weight", (widths[i], widths[i + 1])), (f"dense{i}.bias", (widths[i + 1],))]
    return out


class TensorParallel(BucketedExchange, Strategy):
    """This rank's partition: layers [lo, hi) of the model (all of them unless a pipeline cuts it),
    sharded over tp_comm and replicated over dp_comm. `PipelineParallel` adds the stages."""

    name = "tensor"

    def __init__(self, cfg: JobConfig, grid: Grid, global_batch: int):
        # Not Strategy.__init__: that builds the whole model, which is what this layout avoids.
        self.cfg, self.grid, self.global_batch = cfg, grid, global_batch
        m = cfg.model
        self.check_config()
        self.micro_batches = cfg.parallel.micro_batches
        self.micro_batch = global_batch // grid.dp // self.micro_batches  # rows per micro-batch
        self.splits = layer_splits(len(m.layers) - 1, grid.tp)
        lo, hi = self.stage_range()
        self.stage = Stage(m.layers, lo, hi, m.activation, m.loss, m.dtype, cfg.run.seed, m.init,
                           self.splits, grid.tp, grid.tp_rank)
        self.model = self.stage
        self.flat = self.stage.flat
        self.device = cfg.backend.device
        self.opt = optim.build(cfg.optimizer, self.flat.segments(), device=self.device, source=cfg.source)
        self.opt_state = self.opt.init_state(self.flat.size)
        if self.device == "cuda":  # as Strategy: optimizer kernels over device mirrors of the flat buffers
            from numba import cuda

            self.d_params, self.d_grad = cuda.to_device(self.flat.data), cuda.device_array_like(self.flat.grad)
        # tensors every tp rank holds alike: their share of the norm is counted on tp rank 0 only
        self.replicated = [k for k in self.flat.keys()
                           if grid.tp > 1 and (self.stage.layer(k).split == FULL or
                                               (self.stage.layer(k).split == ROW and k.endswith(".bias")))]
        self.reports_loss = self.stage.is_last and grid.tp_rank == 0  # one rank per dp replica
        # this partition's gradients summed over its dp replicas: buckets, overlapped with the last
        # micro-batch's backward (the one that leaves them final)
        self.setup_buckets([layer.name for layer in self.stage.layers], lo)

    # -- configuration -----------------------------------------------------------------------
    def check_config(self) -> None:
        """One-line ConfigErrors naming the keys (runs inside comm.agree: no communication)."""
        cfg, g, src = self.cfg, self.grid, self.cfg.source
        widths, M = cfg.model.layers, cfg.parallel.micro_batches
        per_replica = self.global_batch // g.dp
        if per_replica % M:
            raise ConfigError(f"{src}: parallel.micro_batches = {M} does not divide the per-replica batch "
                              f"data.batch_size / dp = {self.global_batch}/{g.dp} = {per_replica}")
        if g.tp > 1:
            for i, split in enumerate(layer_splits(len(widths) - 1, g.tp)):
                if split == COLUMN and widths[i + 1] % g.tp:
                    raise ConfigError(f"{src}: model.layers[{i + 1}] = {widths[i + 1]} does not divide by "
                                      f"parallel.tp = {g.tp} (dense{i} and dense{i + 1} split that width)")
            if cfg.optimizer.name in ("lars", "lamb"):
                raise ConfigError(f"{src}: optimizer.name = \"{cfg.optimizer.name}\" takes per-tensor norms, "
                                  f"which parallel.tp = {g.tp} splits over ranks: use parallel.tp = 1")

    def stage_range(self) -> tuple[int, int]:
        return 0, len(self.cfg.model.layers) - 1

    # -- tensor-parallel sums ----------------------------------------------------------------
    def tp_sum(self, a: np.ndarray) -> None:
        """a := the sum of a over the tp ranks (in place); nothing when tp = 1."""
        if self.grid.tp > 1:
            self.grid.tp_comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    # -- one step ------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        """Micro-batches one after another (gradient accumulation), then exchange and update."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        mb, loss_sum = self.micro_batch, 0.0
        for k in range(self.micro_batches):
            rows = slice(k * mb, (k + 1) * mb)
            acts = self.stage.forward(x[rows], tp_sum=self.tp_sum)
            dout = np.empty_like(acts[-1])
            loss_sum += self.stage.loss(acts[-1], labels[rows], self.global_batch, dout)
            last = k == self.micro_batches - 1
            self.stage.backward(acts, dout, need_dx=False, accumulate=k > 0, tp_sum=self.tp_sum,
                                on_layer_done=self.layer_done_hook() if last else None)
        self.sync_grads()
        norm, finite = self.clip_and_update(t, lr)
        return StepResult(loss_sum if self.reports_loss else 0.0, norm, finite)

    def norm_sum(self):
        """allreduce_sum for clip_and_check: this rank's squared norm -> the model's, every tensor once."""
        comms = [c for c in (self.grid.tp_comm, self.grid.pp_comm) if c.Get_size() > 1]
        if not comms:
            return None
        own: list[float] = []  # what tp ranks > 0 take back out, in clip_and_check's call order
        if self.replicated and self.grid.tp_rank > 0:
            sq = sq_clipped = 0.0
            clip_value = self.cfg.optimizer.clip_value
            for k in self.replicated:
                off, g = self.flat.offsets[k], self.flat.spec(k).size
                part = self.flat.grad[off:off + g]
                s, c = optim_cpu.sum_sq_clipped(part, clip_value) if clip_value > 0 else (optim_cpu.sum_sq(part),) * 2
                sq, sq_clipped = sq + s, sq_clipped + c
            own = [sq, sq_clipped]

        def total(v: float) -> float:
            if own:
                v -= own.pop(0)
            for c in comms:
                v = c.allreduce(v, op=MPI.SUM)
            return v
        return total

    def clip_and_update(self, t: int, lr: float, norm_comm: MPI.Comm | None = None) -> tuple[float, bool]:
        """Strategy.clip_and_update with the model-parallel global norm."""
        from ..optim.clip import clip_and_check

        o = self.cfg.optimizer
        total = self.norm_sum()
        if self.device == "cuda":
            self.d_grad.copy_to_device(self.flat.grad)
            norm, finite = clip_and_check(self.d_grad, o.clip_norm, o.clip_value, total)
            if finite:
                self.opt.step(self.d_params, self.d_grad, self.opt_state, t, lr)
                self.d_params.copy_to_host(self.flat.data)
            return norm, finite
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value, total)
        if finite:
            self.opt.step(self.flat.data, self.flat.grad, self.opt_state, t, lr)
        return norm, finite

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        out = self.stage.forward(np.ascontiguousarray(x, dtype=self.dtype), tp_sum=self.tp_sum)[-1]
        loss_sum, correct = self.stage.evaluate(out, labels)
        return (loss_sum, correct) if self.reports_loss else (0.0, 0)

    # -- checkpoints ---------------------------------------------------------------------------
    def gather_columns(self, local: np.ndarray) -> np.ndarray:
        """A COLUMN shard (n_in, n/tp) or (n/tp,) -> the whole tensor, on every tp rank (Allgather)."""
        tp = self.grid.tp
        parts = np.empty((tp,) + local.shape, dtype=local.dtype)
        self.grid.tp_comm.Allgather(np.ascontiguousarray(local), parts)
        if local.ndim == 1:
            return parts.reshape(-1)
        return parts.transpose(1, 0, 2).reshape(local.shape[0], tp * local.shape[1])

    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        """Every rank lists every dataset of the whole model (creation is collective), with its rows:

        a ROW weight is a row block already (its dp replicas split it); a tensor the tp ranks hold
        alike, or a COLUMN shard gathered over tp, is split among the dp × tp ranks of the stage.
        Tensors of other stages: no rows. So every byte of the global arrays is written once.
        """
        f, g = self.flat, self.grid
        mine = set(f.keys())
        arrays = [("params", f.data)] + [(f"optim/{s}", a) for s, a in sorted(self.host_state().items())]
        pieces = []
        for prefix, buf in arrays:
            for key, shape in global_specs(self.cfg.model.layers):
                name = f"{prefix}/{key.replace('.', '/')}"
                if key not in mine:
                    pieces.append(checkpoint.Piece(name, shape, np.empty((0,) + shape[1:], buf.dtype)))
                    continue
                layer, which = self.stage.layer(key), key.split(".")[1]
                local = f.view_of(buf, key)
                if layer.split == ROW and which == "weight":
                    lo, hi = checkpoint.rows_of(local.shape[0], g.dp_rank, g.dp)
                    pieces.append(checkpoint.Piece(name, shape, local[lo:hi], layer.rows.start + lo))
                    continue
                full = self.gather_columns(local) if layer.split == COLUMN else local
                lo, hi = checkpoint.rows_of(shape[0], g.dp_rank * g.tp + g.tp_rank, g.dp * g.tp)
                pieces.append(checkpoint.Piece(name, shape, full[lo:hi], lo))
        return pieces

    def restore(self, path: str, ckpt: checkpoint.Checkpoint) -> list[str]:
        """This rank's blocks out of the global arrays: any layout that wrote them loads here."""
        f = self.flat
        same_optimizer = ckpt.attrs.get("optimizer") == self.opt.name
        checkpoint.check_complete(path, ckpt, f.keys(), list(self.opt_state) if same_optimizer else [])
        blocks = {}
        for k in f.keys():
            layer, which = self.stage.layer(k), k.split(".")[1]
            if ckpt.params[k].shape != layer.global_shape(which):
                raise DataError(f"{path}: /params/{k.replace('.', '/')} has shape {ckpt.params[k].shape}, "
                                f"the model needs {layer.global_shape(which)}")
            blocks[k] = layer.block(which)
            f.param(k)[...] = ckpt.params[k][blocks[k]]
        if self.device == "cuda":
            self.d_params.copy_to_device(f.data)
        if not same_optimizer:
            return [f"{path}: optimizer state of {ckpt.attrs.get('optimizer')} not loaded into "
                    f"{self.opt.name}: it starts fresh"]
        for s, a in self.host_state().items():
            for k in f.keys():
                f.view_of(a, k)[...] = ckpt.optim[s][k][blocks[k]]
            if self.device == "cuda":
                self.opt_state[s].copy_to_device(a)
        return []
