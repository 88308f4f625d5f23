"""Pipeline parallel: the layers cut into stages over `pp_comm`, micro-batches flowing through them.

Which layers each stage holds (`stage_bounds`: parallel.stage_layers, else balanced by parameters or
FLOPs with an exact partition), and the executor that runs one step's forwards and backwards on this
stage by its schedule (schedule.py: actions as data, one runner). The executor owns the stage's
preallocated buffers; a step's inputs go in and its loss comes out as arguments, never parked on the
strategy. The loss lives on the last stage; gradients accumulate over the micro-batches (each scaled
by 1 / global batch, so their sum is the batch mean); the dp exchange and the update follow the
schedule's `step` (parallel/strategy.py).
"""
from __future__ import annotations

import numpy as np

from .. import modelspec
from ..config import JobConfig
from ..nn.layers import Ctx
from .schedule import TAG_EVAL, StageStats, build_schedule, buffer_slots, run_stage, slots_are_safe, tag


# -- stages ------------------------------------------------------------------------------------
def layer_costs(model, balance: str) -> list[int]:
    """Per unit of the model (a modelspec.Spec, or MLP widths): parameters, or FLOPs per sample of
    forward + backward (GEMMs and convolutions 6 per weight use, elementwise work a few per value, the
    loss ~5 per output on the last)."""
    spec = model if isinstance(model, modelspec.Spec) else modelspec.from_widths(list(model))
    if balance == "params":
        return [spec.params_of(u) for u in spec.units]
    costs = [spec.flops_of(u) for u in spec.units]
    costs[-1] += 5 * int(np.prod(spec.output))
    return costs


def partition(costs: list[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) per stage, each non-empty, minimising the largest stage's cost (exact DP)."""
    n = len(costs)
    prefix = np.concatenate([[0], np.cumsum(costs)])
    INF = float("inf")
    best = [[INF] * (n + 1) for _ in range(stages + 1)]  # best[p][j]: first j layers on p stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for p in range(1, stages + 1):
        for j in range(p, n - (stages - p) + 1):
            for i in range(p - 1, j):
                c = max(best[p - 1][i], prefix[j] - prefix[i])
                if c < best[p][j]:
                    best[p][j], cut[p][j] = c, i
    bounds, j = [], n
    for p in range(stages, 0, -1):
        bounds.append((cut[p][j], j))
        j = cut[p][j]
    return bounds[::-1]


def stage_bounds(cfg: JobConfig, stages: int) -> list[tuple[int, int]]:
    """The [lo, hi) layer range of every stage: parallel.stage_layers, else balanced (the keys were
    checked against the layers by config.validate_layout)."""
    given = cfg.parallel.stage_layers
    if not given:
        return partition(layer_costs(modelspec.from_config(cfg.model, cfg.source), cfg.parallel.balance), stages)
    ends = np.cumsum(given).tolist()
    return [(e - c, e) for c, e in zip(given, ends)]


class PipelineExecutor:
    """One step's forwards and backwards on this rank's stage, by the schedule, with its neighbours.

    partition: this rank's Partition (its Stage, tp_sum, whether it reports the loss); comm: pp_comm,
    whose ranks are the stage indices."""

    def __init__(self, partition, comm, schedule: str, micro_batches: int, micro_batch: int, global_batch: int,
                 repro=None):
        """repro: run.reproducible's reproducible.MicroBatched (fixed-order kernels, dW at the last backward)."""
        self.partition, self.stage, self.comm = partition, partition.stage, comm
        self.repro = repro
        self.rows = None   # run.reproducible: the last step's per-row losses (the last stage's; others none)
        P, s = comm.Get_size(), comm.Get_rank()
        self.micro_batches, self.micro_batch, self.global_batch = micro_batches, micro_batch, global_batch
        self.actions = build_schedule(schedule, P, micro_batches)[s]
        self.slots = buffer_slots(self.actions)
        assert slots_are_safe(self.actions, self.slots)
        self.prev, self.next = s - 1, s + 1
        mb, st, dt = micro_batch, self.stage, self.stage.dtype
        # preallocated per slot: received input, each dense layer's output, the output's gradient, the input's
        self.acts = [st.output_buffers(mb) for _ in range(self.slots)]
        self.inputs = [np.empty((mb, *st.in_shape), dt) if not st.is_first else None for _ in range(self.slots)]
        self.douts = [np.empty((mb, *st.out_shape), dt) for _ in range(self.slots)]
        self.dxs = [np.empty((mb, *st.in_shape), dt) if not st.is_first else None for _ in range(self.slots)]
        self.first_row = partition.grid.dp_rank * micro_batches * micro_batch   # this replica's rows
        self.last_stats: StageStats | None = None

    def run(self, x: np.ndarray, labels: np.ndarray, on_layer_done=None, step: int = 0) -> float:
        """This stage's part of one step; returns its loss contribution (the last stage's, tp rank 0)."""
        work = _StepWork(self, x, labels, on_layer_done, step)
        if self.repro is not None:
            self.rows = work.rows = np.empty(self.micro_batches * self.micro_batch if self.stage.is_last else 0)
        self.last_stats = run_stage(self.actions, work, self.comm, self.prev, self.next)
        return work.loss if self.partition.reports_loss else 0.0

    def evaluate(self, x: np.ndarray, labels: np.ndarray, stage=None):
        """The whole chunk through the stages in turn (no micro-batches, no stored activations)."""
        st = stage or self.stage
        if st.is_first:
            h = np.ascontiguousarray(x, dtype=st.dtype)
        else:
            h = np.empty((len(x), *st.in_shape), st.dtype)
            self.comm.Recv(h, source=self.prev, tag=tag(TAG_EVAL, 0))
        fields = self.repro.ctx_fields(False) if self.repro is not None else {}
        out = st.forward(h, ctx=Ctx(self.partition.tp_sum, training=False, **fields))[-1]
        if not st.is_last:
            self.comm.Send(out, dest=self.next, tag=tag(TAG_EVAL, 0))
            return None
        if not self.partition.reports_loss:
            return None
        return st.score(self.partition.denormalize(out), labels, rows=self.repro is not None)

    def extra_metrics(self) -> dict:
        """This stage's last step as counted by the runner (rank 0's, stage 0's, is logged)."""
        st = self.last_stats
        if st is None:
            return {}
        return dict(pipeline_peak_activations=st.peak_activations,
                    pipeline_wait_fraction=st.waiting / max(st.end - st.start, 1e-12))


class _StepWork:
    """What the runner calls during one step: the buffers it hands to MPI and the compute, over the
    executor's slots (micro-batch k uses slot k mod slots) and this step's batch. A layer that makes its
    own output (any but dense) hands over that array: kept here until its message is posted."""

    def __init__(self, ex: PipelineExecutor, x: np.ndarray, labels: np.ndarray, on_layer_done, step: int):
        self.ex, self.labels, self.on_layer_done, self.step = ex, labels, on_layer_done, step
        self.x = np.ascontiguousarray(x, dtype=ex.stage.dtype) if ex.stage.is_first else None
        self.held: dict[int, list[np.ndarray]] = {}   # micro-batch -> its stored activations
        self.out: dict[int, np.ndarray] = {}          # micro-batch -> its output / input gradient, to send
        self.dx: dict[int, np.ndarray] = {}
        self.loss, self.accumulate = 0.0, False
        self.rows = None   # run.reproducible: each row's loss (last stage)

    def ctx(self, k: int) -> Ctx:
        ex = self.ex
        fields = ex.repro.ctx_fields(True, k) if ex.repro is not None else {}
        return Ctx(ex.partition.tp_sum, ex.partition.dp_sum, True, self.step, ex.first_row + k * ex.micro_batch,
                   **fields)

    def act_in(self, k: int) -> np.ndarray:
        return self.ex.inputs[k % self.ex.slots]

    def act_out(self, k: int) -> np.ndarray:
        return self.out.pop(k)

    def grad_in(self, k: int) -> np.ndarray:
        return self.ex.douts[k % self.ex.slots]

    def grad_out(self, k: int) -> np.ndarray:
        return self.dx.pop(k)

    def forward(self, k: int) -> None:
        ex = self.ex
        slot, mb, st = k % ex.slots, ex.micro_batch, ex.stage
        x = self.x[k * mb:(k + 1) * mb] if st.is_first else ex.inputs[slot]
        acts = st.forward(x, ex.acts[slot], ctx=self.ctx(k))
        if st.is_last:
            self.loss += st.loss(acts[-1], self.labels[k * mb:(k + 1) * mb], ex.global_batch, ex.douts[slot],
                                 self.rows[k * mb:(k + 1) * mb] if self.rows is not None else None)
        else:
            self.out[k] = acts[-1]
        self.held[k] = acts

    def backward(self, k: int) -> None:
        ex = self.ex
        slot = k % ex.slots
        last = k == ex.micro_batches - 1  # backwards run in micro-batch order in every schedule
        dx = ex.stage.backward(self.held.pop(k), ex.douts[slot], need_dx=not ex.stage.is_first,
                               accumulate=self.accumulate, dx_out=ex.dxs[slot], ctx=self.ctx(k),
                               on_layer_done=self.on_layer_done if last else None)
        if dx is not None:
            self.dx[k] = dx
        self.accumulate = True
