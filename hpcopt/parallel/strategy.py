"""A parallel strategy, COMPOSED of parts (DESIGN §1); parallel/__init__.py picks the parts per name.

    partition  this rank's part of the model: a Stage over one flat buffer (partition.py)
    executor   one step's forwards and backwards on it: `Sequential` micro-batches (here), or a
               pipeline schedule with the neighbouring stages (pipeline.py)
    exchange   how gradients meet: bucketed Allreduce or ZeRO's reduce-scatter (data.py, zero.py),
               periodic averaging (local_sgd.py), or nothing
    update     clip -> non-finite check -> optimizer step over the views the layout names (update.py)

    step:  hook = exchange.layer_done_hook() -> loss = executor.run(x, labels, hook)
           -> exchange.reduce() -> norm, applied = update.apply(t, lr) -> exchange.after_update(t, applied)

The Trainer owns the loop, data, metrics, evaluation bookkeeping, signals and when to checkpoint; it
calls only the methods below, on every rank, in the same order:
    step(x, labels, t, lr) -> StepResult   x, labels: this rank's dp slice of the global batch (rows);
                                           t: 1-based index of the update if applied; lr: after schedule
    prepare_evaluate()                     collective, before each evaluation
    evaluate(x, labels) -> sums | None     losses.scores contributions that SUM over the world to the
                                           totals (None: this rank reports none); run.reproducible:
                                           each row's (losses.row_scores), summed exactly
    checkpoint_pieces() -> [checkpoint.Piece]      this rank's share of every global dataset
    restore(path, ckpt) -> notes                   global arrays -> this rank's buffers and state
    extra_metrics() -> dict                        at each logged step, merged into rank 0's record
`StepResult.loss_sum` is likewise this rank's contribution: summed over the world it is the global
batch's loss sum (a pipeline's last stage reports it, other stages 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import checkpoint
from ..errors import DataError
from ..nn.layers import Ctx


@dataclass
class StepResult:
    loss_sum: float     # this rank's contribution to the global batch's loss sum
    grad_norm: float    # global gradient L2 norm before clipping (inf/nan if non-finite)
    applied: bool       # False: non-finite gradient, update skipped on every rank
    rows: np.ndarray | None = None  # run.reproducible: this rank's per-row losses (summed exactly when logged)


class Exchange:
    """No exchange (each rank's gradient is the update's): the hooks every exchange has, doing nothing."""

    def layer_done_hook(self):
        """Called before each step's backward: what backward calls as each layer finishes, or None."""
        return None

    def reduce(self) -> None:
        """After backward: make the gradient the update needs."""

    def after_update(self, t: int, applied: bool) -> None:
        """After the update (applied or skipped on every rank)."""

    def prepare_evaluate(self):
        """Collective, before an evaluation: the Stage to evaluate instead of this rank's own, or None."""
        return None

    def before_checkpoint(self) -> None:
        """Collective, before the checkpoint pieces are taken."""

    def after_restore(self) -> None:
        """A checkpoint was loaded into the buffers."""

    def extra_metrics(self) -> dict:
        return {}


class Sequential:
    """Micro-batches one after another on this rank's partition (gradient accumulation; one for data
    parallel). scale: the loss gradient's 1 / scale (the global batch, or the local batch when each
    rank steps on the MEAN gradient of its own slice). This rank's rows are rows
    [dp_rank · rows, (dp_rank + 1) · rows) of the global batch (dropout's stream is keyed by them)."""

    def __init__(self, partition, micro_batches: int, micro_batch: int, scale: int, repro=None):
        """repro: run.reproducible's fixed-order kernels (reproducible.py), handed to the layers by Ctx."""
        self.partition, self.stage = partition, partition.stage
        self.micro_batches, self.micro_batch, self.scale = micro_batches, micro_batch, scale
        self.first_row = partition.grid.dp_rank * micro_batches * micro_batch
        self.train_fields = repro.ctx_fields(True) if repro is not None else {}
        self.eval_fields = repro.ctx_fields(False) if repro is not None else {}
        self.keep_rows = repro is not None   # run.reproducible: each row's loss, for an exact logged loss
        self.rows = None                     # the last step's per-row losses (keep_rows)

    def run(self, x: np.ndarray, labels: np.ndarray, on_layer_done=None, step: int = 0) -> float:
        st, part, mb = self.stage, self.partition, self.micro_batch
        x = np.ascontiguousarray(x, dtype=st.dtype)
        loss_sum = 0.0
        if self.keep_rows:
            self.rows = np.empty(self.micro_batches * mb)
        for k in range(self.micro_batches):
            rows = slice(k * mb, (k + 1) * mb)
            ctx = Ctx(part.tp_sum, part.dp_sum, True, step, self.first_row + k * mb, **self.train_fields)
            acts = st.forward(x[rows], ctx=ctx)                       # [x, ..., out (mb, outputs)]
            dout = np.empty_like(acts[-1])
            loss_sum += st.loss(acts[-1], labels[rows], self.scale, dout,
                                self.rows[rows] if self.keep_rows else None)
            last = k == self.micro_batches - 1  # the backward that leaves the gradients final
            st.backward(acts, dout, need_dx=False, accumulate=k > 0, ctx=ctx,
                        on_layer_done=on_layer_done if last else None)
        return loss_sum if self.partition.reports_loss else 0.0

    def evaluate(self, x: np.ndarray, labels: np.ndarray, stage=None) -> np.ndarray | None:
        st = stage or self.stage
        ctx = Ctx(self.partition.tp_sum, training=False, **self.eval_fields)
        out = st.forward(np.ascontiguousarray(x, dtype=st.dtype), ctx=ctx)[-1]
        if not self.partition.reports_loss:
            return None
        return st.score(self.partition.denormalize(out), labels, rows=self.keep_rows)

    def extra_metrics(self) -> dict:
        return {}


class Strategy:
    """partition + executor + exchange + update; `state_blocks`: where the update's state arrays sit in
    the global tensors (default: like the parameters; a ZeRO shard: its rows)."""

    def __init__(self, name: str, partition, executor, exchange: Exchange, update,
                 state_blocks: dict[str, checkpoint.Block] | None = None):
        self.name, self.partition, self.executor, self.exchange, self.update = (
            name, partition, executor, exchange, update)
        self.flat = partition.flat
        self.stage = partition.stage
        self.param_blocks = partition.blocks()
        self.state_blocks = state_blocks if state_blocks is not None else self.param_blocks
        self.buffer_blocks = partition.buffer_blocks()
        self.eval_stage = None

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    # -- one step --------------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        hook = self.exchange.layer_done_hook()
        loss_sum = self.executor.run(x, labels, hook, t)
        self.exchange.reduce()
        norm, applied = self.update.apply(t, lr)
        self.exchange.after_update(t, applied)
        return StepResult(loss_sum, norm, applied, getattr(self.executor, "rows", None))

    # -- evaluation ------------------------------------------------------------------------------------
    def prepare_evaluate(self) -> None:
        self.eval_stage = self.exchange.prepare_evaluate()

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        return self.executor.evaluate(x, labels, self.eval_stage)

    def extra_metrics(self) -> dict:
        """Strategy-specific figures for the metrics record of a logged step (bytes sent per step,
        pipeline waits, ...). Called on every rank at the same steps; rank 0's dict is logged."""
        return dict(self.exchange.extra_metrics(), **self.executor.extra_metrics())

    # -- checkpoints: every layout through checkpoint.piece / restore_block ---------------------------
    def local_state(self) -> list[np.ndarray]:
        """This rank's parameters, optimizer state and buffers as arrays to read or overwrite in place
        (population-based training copies a member's into another's, rank by rank, same layout); call
        `local_state_loaded()` after writing them. Collective (local SGD averages the replicas first)."""
        self.exchange.before_checkpoint()
        host = self.update.host_state()
        return [self.flat.data, *(host[s] for s in sorted(host)), self.stage.buffers.data]

    def local_state_loaded(self, arrays: list[np.ndarray]) -> None:
        host = self.update.host_state()
        self.update.params_changed()
        self.update.load_state({s: a for s, a in zip(sorted(host), arrays[1:-1])})
        self.exchange.after_restore()

    def set_optimizer(self, cfg) -> None:
        """Other hyperparameters of the same optimizer from now on (its state kept): population-based training."""
        self.update.set_optimizer(cfg)

    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        """This rank's share of every dataset of the whole model, in the same order on every rank."""
        self.exchange.before_checkpoint()
        host = self.update.host_state()
        arrays = [("params", self.flat.data, self.param_blocks, self.dtype)]
        arrays += [(f"optim/{s}", host.get(s), self.state_blocks if s in host else {}, np.float32)
                   for s in self.update.state_names]
        pieces = [checkpoint.piece(prefix, key, shape, blocks.get(key), buf, dtype)
                  for prefix, buf, blocks, dtype in arrays for key, shape in self.partition.global_specs]
        return pieces + [checkpoint.piece("buffers", key, shape, self.buffer_blocks.get(key), self.stage.buffers.data,
                                          np.float64) for key, shape in self.partition.global_buffers]

    def restore(self, path: str, ckpt: checkpoint.Checkpoint, load_state: bool = True) -> list[str]:
        """Load this rank's blocks of the global arrays: any layout that wrote them loads here.
        load_state=False: the parameters only (the optimizer state starts fresh). Returns notes."""
        same_optimizer = ckpt.attrs.get("optimizer") == self.update.name
        if not load_state:
            same_optimizer = False
        blocks = self.partition.blocks()  # what this rank holds (a writer or not)
        checkpoint.check_complete(path, ckpt, list(blocks), list(self.update.state) if same_optimizer else [])
        for k, b in blocks.items():
            shape = self.partition.global_shape(k)
            if ckpt.params[k].shape != shape:
                raise DataError(f"{path}: /{checkpoint.dataset_name('params', k)} has shape {ckpt.params[k].shape}, "
                                f"the model needs {shape}")
            checkpoint.restore_block(ckpt.params[k], b, self.flat.data)
        for k, b in self.partition.buffer_blocks().items():
            if k not in ckpt.buffers:
                raise DataError(f"{path}: missing dataset /{checkpoint.dataset_name('buffers', k)}")
            checkpoint.restore_block(ckpt.buffers[k], b, self.stage.buffers.data)
        self.update.params_changed()
        self.exchange.after_restore()
        if not same_optimizer:
            if not load_state:
                return []  # said by the Trainer's resume check
            return [f"{path}: optimizer state of {ckpt.attrs.get('optimizer')} not loaded into "
                    f"{self.update.name}: it starts fresh"]
        host = self.update.host_state()
        for s, a in host.items():
            for k, b in self.state_blocks.items():
                checkpoint.restore_block(ckpt.optim[s][k], b, a)
        self.update.load_state(host)
        return []
