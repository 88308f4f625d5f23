"""Pipeline schedules as DATA: what each stage does in one step, lowered with its messages, checked,
simulated and printed. No model and no buffers here: the pipeline executor (pipeline.py) supplies them.

A schedule is, for each stage, a list of actions
    F k / B k             forward / backward of micro-batch k on this stage
    recv_act k, send_act k      activations from the previous stage / to the next (Irecv / Isend)
    recv_grad k, send_grad k    gradients from the next stage / to the previous
    step                  wait for this step's sends: the stage's gradients are final (the update follows)
and ONE runner (`run_stage`) executes any such list, so a new schedule is a new list:
    gpipe   all forwards, then all backwards: every stage holds M micro-batches of activations
    1f1b    stage s runs P-s-1 warm-up forwards, then one forward / one backward, then the cool-down
            backwards: at most P-s micro-batches of activations (P on stage 0)
Both leave the same idle "bubble", (P-1)/(M+P-1) of a step with equal stages; 1F1B's gain is memory.
Receives are posted ahead of the compute that waits for them (the next forward's activations before this
forward runs; a micro-batch's gradient as soon as its activations are sent) into preallocated buffers:
a micro-batch k uses buffer slot k mod S, S the most micro-batches a stage has in flight (from the
schedule). Message tags 3k + {0: activation, 1: gradient, 2: evaluation} cannot collide.

Dry run: `hpcopt schedule --pp 4 --micro-batches 8 --schedule 1f1b` prints each stage's action list,
a timeline, and the peak activations and bubble per stage.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from mpi4py import MPI

from ..names import PIPELINE_SCHEDULES

FORWARD, BACKWARD, RECV_ACT, SEND_ACT, RECV_GRAD, SEND_GRAD, STEP = (
    "F", "B", "recv_act", "send_act", "recv_grad", "send_grad", "step")
_SHORT = {FORWARD: "F", BACKWARD: "B", RECV_ACT: "rA", SEND_ACT: "sA", RECV_GRAD: "rG", SEND_GRAD: "sG", STEP: "step"}
TAG_ACT, TAG_GRAD, TAG_EVAL = 0, 1, 2


def tag(kind: int, micro_batch: int) -> int:
    """Message tag of micro-batch k's activation / gradient / evaluation message: distinct for all."""
    return 3 * micro_batch + kind


@dataclass(frozen=True)
class Action:
    op: str
    mb: int = -1   # micro-batch; -1 for step

    def __str__(self) -> str:
        return _SHORT[self.op] + (str(self.mb) if self.mb >= 0 else "")


# -- schedules as data ---------------------------------------------------------------------------
def gpipe(P: int, M: int) -> list[list[Action]]:
    """All forwards, then all backwards (compute actions only)."""
    return [[Action(FORWARD, k) for k in range(M)] + [Action(BACKWARD, k) for k in range(M)] for _ in range(P)]


def one_f_one_b(P: int, M: int) -> list[list[Action]]:
    """Warm-up forwards (P-s-1 on stage s), steady one-forward-one-backward, cool-down backwards."""
    out = []
    for s in range(P):
        warm = min(P - s - 1, M)
        acts = [Action(FORWARD, k) for k in range(warm)]
        for i in range(M - warm):
            acts += [Action(FORWARD, warm + i), Action(BACKWARD, i)]
        acts += [Action(BACKWARD, k) for k in range(M - warm, M)]
        out.append(acts)
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}
assert tuple(SCHEDULES) == PIPELINE_SCHEDULES, "names.PIPELINE_SCHEDULES lists the schedules"


def with_messages(compute: list[list[Action]]) -> list[list[Action]]:
    """Each stage's compute list with its point-to-point actions and the final step.

    The receive for the next forward is posted before this forward runs; a micro-batch's gradient
    receive right after its activations are sent; sends follow the compute that fills them.
    """
    P = len(compute)
    out = []
    for s, acts in enumerate(compute):
        forwards = [a.mb for a in acts if a.op == FORWARD]
        seq: list[Action] = []
        if s > 0 and forwards:
            seq.append(Action(RECV_ACT, forwards[0]))
        j = 0
        for a in acts:
            if a.op == FORWARD:
                j += 1
                if s > 0 and j < len(forwards):
                    seq.append(Action(RECV_ACT, forwards[j]))
                seq.append(a)
                if s < P - 1:
                    seq += [Action(SEND_ACT, a.mb), Action(RECV_GRAD, a.mb)]
            else:
                seq.append(a)
                if s > 0:
                    seq.append(Action(SEND_GRAD, a.mb))
        seq.append(Action(STEP))
        out.append(seq)
    return out


def build_schedule(name: str, P: int, M: int) -> list[list[Action]]:
    """The full action list of every stage for schedule `name`."""
    return with_messages(SCHEDULES[name](P, M))


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batches whose forward is done and backward is not: the activations a stage holds."""
    held = peak = 0
    for a in actions:
        held += (a.op == FORWARD) - (a.op == BACKWARD)
        peak = max(peak, held)
    return peak


def micro_batch_spans(actions: list[Action]) -> tuple[dict[int, int], dict[int, int]]:
    """Per micro-batch: the position of its first and of its last action in the list."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, a in enumerate(actions):
        if a.mb >= 0:
            first.setdefault(a.mb, i)
            last[a.mb] = i
    return first, last


def buffer_slots(actions: list[Action]) -> int:
    """Most micro-batches in flight at once, from a micro-batch's first action to its last: the buffer
    slots a stage needs (micro-batch k uses slot k mod slots)."""
    first, last = micro_batch_spans(actions)
    if not first:
        return 1
    edges = sorted([(i, 1) for i in first.values()] + [(i + 0.5, -1) for i in last.values()])
    live = peak = 0
    for _, d in edges:
        live += d
        peak = max(peak, live)
    return peak


def slots_are_safe(actions: list[Action], slots: int) -> bool:
    """Micro-batch k may reuse k - slots's buffers only after k - slots's last action."""
    first, last = micro_batch_spans(actions)
    return all(first[k] > last[k - slots] for k in first if k - slots in last)


@dataclass
class Timeline:
    """A simulated run: per stage, (start, end, action) of each compute action."""
    stages: list[list[tuple[float, float, Action]]]
    span: float

    def bubble(self, s: int) -> float:
        busy = sum(e - b for b, e, _ in self.stages[s])
        return 1 - busy / self.span


def simulate(schedule: list[list[Action]], t_forward: float = 1.0, t_backward: float = 2.0,
             costs: dict[tuple[int, str, int], float] | None = None) -> Timeline:
    """Run the schedule on a model machine: one processor per stage, messages free; a forward costs
    t_forward, a backward t_backward, or `costs[(stage, op, mb)]` where given (measured durations,
    to replay a real run). Raises ValueError if the schedule deadlocks or consumes a message it
    never received."""
    P = len(schedule)
    pos, clock = [0] * P, [0.0] * P
    sent: dict[tuple[str, int, int], float] = {}   # (kind, from stage, mb) -> time sent
    posted: list[set] = [set() for _ in range(P)]
    out: list[list] = [[] for _ in range(P)]
    while any(pos[s] < len(schedule[s]) for s in range(P)):
        progress = False
        for s in range(P):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                if a.op in (RECV_ACT, RECV_GRAD):
                    posted[s].add((a.op, a.mb))
                elif a.op in (SEND_ACT, SEND_GRAD):
                    sent[(a.op, s, a.mb)] = clock[s]
                elif a.op in (FORWARD, BACKWARD):
                    need = None
                    if a.op == FORWARD and s > 0:
                        need, src = (RECV_ACT, a.mb), (SEND_ACT, s - 1, a.mb)
                    elif a.op == BACKWARD and s < P - 1:
                        need, src = (RECV_GRAD, a.mb), (SEND_GRAD, s + 1, a.mb)
                    start = clock[s]
                    if need is not None:
                        if need not in posted[s]:
                            raise ValueError(f"stage {s}: {a} runs before its receive is posted")
                        if src not in sent:
                            break  # blocked on the peer
                        start = max(start, sent[src])
                    cost = t_forward if a.op == FORWARD else t_backward
                    if costs is not None:
                        cost = costs[(s, a.op, a.mb)]
                    clock[s] = start + cost
                    out[s].append((start, clock[s], a))
                pos[s] += 1
                progress = True
        if not progress:
            raise ValueError("schedule deadlocks: " + ", ".join(
                f"stage {s} waits at {schedule[s][pos[s]]}" for s in range(P) if pos[s] < len(schedule[s])))
    return Timeline(out, max(clock))


def theoretical_bubble(P: int, M: int) -> float:
    return (P - 1) / (M + P - 1)


def table(name: str, P: int, M: int, t_forward: float = 1.0, t_backward: float = 2.0, file=None) -> None:
    """The dry run: each stage's action list, a timeline, peak activations and bubble per stage."""
    file = file or sys.stdout
    sched = build_schedule(name, P, M)
    tl = simulate(sched, t_forward, t_backward)
    print(f"schedule {name}: P = {P} stages, M = {M} micro-batches; forward {t_forward:g}, backward "
          f"{t_backward:g} time units; theoretical bubble (P-1)/(M+P-1) = {theoretical_bubble(P, M):.3f}", file=file)
    print("\nactions per stage (rA/sA: receive/send activations, rG/sG: gradients):", file=file)
    for s, acts in enumerate(sched):
        print(f"  stage {s}: " + " ".join(str(a) for a in acts), file=file)
    unit = min(t_forward, t_backward)
    cols = int(round(tl.span / unit))
    print(f"\ntimeline (one column = {unit:g} time unit{'s' if unit != 1 else ''}, . = idle):", file=file)
    w = max(3, len(str(M - 1)) + 2)
    print("  " + " " * 8 + "".join(f"{c:<{w}}" for c in range(0, cols)), file=file)
    for s, events in enumerate(tl.stages):
        row = ["."] * cols
        for b, e, a in events:
            for c in range(int(round(b / unit)), int(round(e / unit))):
                row[c] = str(a)
        print(f"  stage {s} " + "".join(f"{c:<{w}}" for c in row), file=file)
    print(f"\n  {'stage':>5}  {'peak activations':>16}  {'buffer slots':>12}  {'bubble':>6}", file=file)
    for s, acts in enumerate(sched):
        print(f"  {s:>5}  {peak_activations(acts):>16}  {buffer_slots(acts):>12}  {tl.bubble(s):>6.3f}", file=file)


# -- the runner --------------------------------------------------------------------------------
@dataclass
class StageStats:
    """What one stage did in one step (wall-clock seconds from time.perf_counter)."""
    start: float = 0.0
    end: float = 0.0                 # end of the last compute action
    busy: float = 0.0                # in forward/backward compute
    waiting: float = 0.0             # blocked on a receive
    peak_activations: int = 0        # most micro-batches of activations held at once
    events: list[tuple[str, int, float, float, float]] = field(default_factory=list)
    # per compute action: (op, mb, wall start, wall end, CPU seconds of this thread)


def run_stage(actions: list[Action], work, comm: MPI.Comm, prev: int, nxt: int) -> StageStats:
    """Execute one stage's action list. `work` provides the compute, forward(k) and backward(k), and
    the buffers act_in(k), act_out(k), grad_in(k), grad_out(k); prev/nxt: the neighbour stages' ranks
    in comm. Returns at `step` with the stage's gradients final. Counts the activations held and times
    compute vs waiting."""
    stats = StageStats(start=time.perf_counter())
    recvs: dict[tuple[str, int], MPI.Request] = {}
    sends: list[MPI.Request] = []
    held = 0
    for a in actions:
        k = a.mb
        if a.op == RECV_ACT:
            recvs[(RECV_ACT, k)] = comm.Irecv(work.act_in(k), source=prev, tag=tag(TAG_ACT, k))
        elif a.op == RECV_GRAD:
            recvs[(RECV_GRAD, k)] = comm.Irecv(work.grad_in(k), source=nxt, tag=tag(TAG_GRAD, k))
        elif a.op in (FORWARD, BACKWARD):
            req = recvs.pop((RECV_ACT if a.op == FORWARD else RECV_GRAD, k), None)
            t0 = time.perf_counter()
            if req is not None:
                req.Wait()
            t1, c1 = time.perf_counter(), time.thread_time()
            if a.op == FORWARD:
                work.forward(k)
            else:
                work.backward(k)
            t2, c2 = time.perf_counter(), time.thread_time()
            stats.waiting += t1 - t0
            stats.busy += t2 - t1
            stats.end = t2
            stats.events.append((a.op, k, t1, t2, c2 - c1))
            held += 1 if a.op == FORWARD else -1
            stats.peak_activations = max(stats.peak_activations, held)
        elif a.op == SEND_ACT:
            sends.append(comm.Isend(work.act_out(k), dest=nxt, tag=tag(TAG_ACT, k)))
        elif a.op == SEND_GRAD:
            sends.append(comm.Isend(work.grad_out(k), dest=prev, tag=tag(TAG_GRAD, k)))
        elif a.op == STEP:
            MPI.Request.Waitall(sends)
            sends.clear()  # every message of this step has left: the caller exchanges and updates
    if recvs or sends:
        raise RuntimeError(f"schedule left requests open: {sorted(recvs)} / {len(sends)} sends")
    return stats



def run(a: argparse.Namespace) -> int:
    """`hpcopt schedule` (options in cli.py): print the table; ConfigError for impossible sizes."""
    if a.pp < 1 or a.micro_batches < 1:
        from ..errors import ConfigError

        raise ConfigError("--pp and --micro-batches must be >= 1")
    table(a.schedule, a.pp, a.micro_batches, a.forward_cost, a.backward_cost)
    return 0
