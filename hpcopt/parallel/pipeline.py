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

from ..config import JobConfig
from .schedule import TAG_EVAL, StageStats, build_schedule, buffer_slots, run_stage, slots_are_safe, tag


# -- stages ------------------------------------------------------------------------------------
def layer_costs(widths: list[int], balance: str) -> list[int]:
    """Per layer: parameters, or FLOPs per sample of forward + backward (GEMMs 6·n_in·n_out, bias and
    activation 4·n_out, the loss ~5·n_out on the last)."""
    n = len(widths) - 1
    if balance == "params":
        return [widths[i] * widths[i + 1] + widths[i + 1] for i in range(n)]
    return [6 * widths[i] * widths[i + 1] + 4 * widths[i + 1] + (5 * widths[i + 1] if i == n - 1 else 0)
            for i in range(n)]


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
        return partition(layer_costs(cfg.model.layers, cfg.parallel.balance), stages)
    ends = np.cumsum(given).tolist()
    return [(e - c, e) for c, e in zip(given, ends)]


class PipelineExecutor:
    """One step's forwards and backwards on this rank's stage, by the schedule, with its neighbours.

    partition: this rank's Partition (its Stage, tp_sum, whether it reports the loss); comm: pp_comm,
    whose ranks are the stage indices."""

    def __init__(self, partition, comm, schedule: str, micro_batches: int, micro_batch: int, global_batch: int):
        self.partition, self.stage, self.comm = partition, partition.stage, comm
        P, s = comm.Get_size(), comm.Get_rank()
        self.micro_batches, self.micro_batch, self.global_batch = micro_batches, micro_batch, global_batch
        self.actions = build_schedule(schedule, P, micro_batches)[s]
        self.slots = buffer_slots(self.actions)
        assert slots_are_safe(self.actions, self.slots)
        self.prev, self.next = s - 1, s + 1
        mb, st, dt = micro_batch, self.stage, self.stage.dtype
        # preallocated per slot: received input, each layer's output, the output's gradient, the input's
        self.acts = [[np.empty((mb, layer.n_out), dt) for layer in st.layers] for _ in range(self.slots)]
        self.inputs = [np.empty((mb, st.in_width), dt) if not st.is_first else None for _ in range(self.slots)]
        self.douts = [np.empty((mb, st.out_width), dt) for _ in range(self.slots)]
        self.dxs = [np.empty((mb, st.in_width), dt) if not st.is_first else None for _ in range(self.slots)]
        self.last_stats: StageStats | None = None

    def run(self, x: np.ndarray, labels: np.ndarray, on_layer_done=None) -> float:
        """This stage's part of one step; returns its loss contribution (the last stage's, tp rank 0)."""
        work = _StepWork(self, x, labels, on_layer_done)
        self.last_stats = run_stage(self.actions, work, self.comm, self.prev, self.next)
        return work.loss if self.partition.reports_loss else 0.0

    def evaluate(self, x: np.ndarray, labels: np.ndarray, stage=None) -> tuple[float, int]:
        """The whole chunk through the stages in turn (no micro-batches, no stored activations)."""
        st, tp_sum = stage or self.stage, self.partition.tp_sum
        if st.is_first:
            h = np.ascontiguousarray(x, dtype=st.dtype)
        else:
            h = np.empty((len(x), st.in_width), st.dtype)
            self.comm.Recv(h, source=self.prev, tag=tag(TAG_EVAL, 0))
        out = st.forward(h, tp_sum=tp_sum)[-1]
        if not st.is_last:
            self.comm.Send(out, dest=self.next, tag=tag(TAG_EVAL, 0))
            return 0.0, 0
        loss_sum, correct = st.score(out, labels)
        return (loss_sum, correct) if self.partition.reports_loss else (0.0, 0)

    def extra_metrics(self) -> dict:
        """This stage's last step as counted by the runner (rank 0's, stage 0's, is logged)."""
        st = self.last_stats
        if st is None:
            return {}
        return dict(pipeline_peak_activations=st.peak_activations,
                    pipeline_wait_fraction=st.waiting / max(st.end - st.start, 1e-12))


class _StepWork:
    """What the runner calls during one step: the buffers it hands to MPI and the compute, over the
    executor's slots (micro-batch k uses slot k mod slots) and this step's batch."""

    def __init__(self, ex: PipelineExecutor, x: np.ndarray, labels: np.ndarray, on_layer_done):
        self.ex, self.labels, self.on_layer_done = ex, labels, on_layer_done
        self.x = np.ascontiguousarray(x, dtype=ex.stage.dtype) if ex.stage.is_first else None
        self.held: dict[int, list[np.ndarray]] = {}   # micro-batch -> its stored activations
        self.loss, self.accumulate = 0.0, False

    def act_in(self, k: int) -> np.ndarray:
        return self.ex.inputs[k % self.ex.slots]

    def act_out(self, k: int) -> np.ndarray:
        return self.ex.acts[k % self.ex.slots][-1]

    def grad_in(self, k: int) -> np.ndarray:
        return self.ex.douts[k % self.ex.slots]

    def grad_out(self, k: int) -> np.ndarray:
        return self.ex.dxs[k % self.ex.slots]

    def forward(self, k: int) -> None:
        ex = self.ex
        slot, mb, st = k % ex.slots, ex.micro_batch, ex.stage
        x = self.x[k * mb:(k + 1) * mb] if st.is_first else ex.inputs[slot]
        acts = st.forward(x, ex.acts[slot], ex.partition.tp_sum)
        if st.is_last:
            self.loss += st.loss(acts[-1], self.labels[k * mb:(k + 1) * mb], ex.global_batch, ex.douts[slot])
        self.held[k] = acts

    def backward(self, k: int) -> None:
        ex = self.ex
        slot = k % ex.slots
        last = k == ex.micro_batches - 1  # backwards run in micro-batch order in every schedule
        ex.stage.backward(self.held.pop(k), ex.douts[slot], need_dx=not ex.stage.is_first,
                          accumulate=self.accumulate, dx_out=ex.dxs[slot], tp_sum=ex.partition.tp_sum,
                          on_layer_done=self.on_layer_done if last else None)
        self.accumulate = True
