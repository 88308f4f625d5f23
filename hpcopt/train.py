"""The Trainer: the loop, data, metrics, evaluation, signals and checkpoint timing (DESIGN §1).

    step: loader -> strategy.step (forward/backward, gradient exchange, clip/check, update) -> metrics
          -> maybe checkpoint (periodic, timed, or on SIGUSR1/SIGTERM at a step all ranks agree on)
What moves between ranks within a step belongs to the strategy (hpcopt/parallel).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from . import checkpoint, config, modelspec, optim, parallel, rundir
from .comm import Grid, agree
from .data import ShardedLoader, inspect
from .data.importer import read_stats
from .diagnosis import fingerprint
from .diagnosis.watchdog import NullWatchdog, Watchdog
from .errors import ConfigError, DataError, NonFiniteError
from .metrics import MetricsLog, Progress, process_start_time
from .nn import losses
from .optim.schedules import lr_at
from .signals import StopSignals

AGREE_S = 0.02     # checkpoint_due agrees about every this many seconds of steps (a signal waits at most this)
AGREE_MAX = 1000   # ... and at least every this many steps


@dataclass
class Summary:
    steps: int
    seconds: float
    samples_per_s: float
    test_accuracy: float
    test_loss: float
    out_dir: str
    checkpoint: str | None
    stopped_by: str | None = None   # "signal SIGUSR1" when a signal ended the run early
    finished_at: int | None = None  # the run had already reached its last step when it was resumed
    test_rel_l2: float | None = None  # regression: mean relative L2 error on the test split, and R²
    test_r2: float | None = None

    def line(self) -> str:
        if self.finished_at is not None:
            return (f"nothing to do: the run in {self.out_dir} finished at step {self.finished_at} "
                    f"(raise run.steps or run.epochs to train on); nothing was changed")
        if self.stopped_by:
            return (f"stopped by {self.stopped_by} after {self.steps} steps: checkpoint {self.checkpoint}; "
                    f"continue with --resume auto")
        score = (f"test relative L2 {self.test_rel_l2:.4f}, R2 {self.test_r2:.4f}" if self.test_rel_l2 is not None
                 else f"test accuracy {100 * self.test_accuracy:.2f}%")
        return (f"done: {self.steps} steps in {self.seconds:.1f} s, {self.samples_per_s:,.0f} samples/s, "
                f"{score}, run directory {self.out_dir}")


def prepare(cfg: config.JobConfig, grid: Grid, out_dir: str, resume: str | None, info=None):
    """Start-up checks that every rank runs before any collective: data file and run directory.
    info: the data file's DataInfo when already checked (a sweep's node-shared data).

    Raises a user error with one line; called through comm.agree so all ranks leave together.
    """
    if info is None:
        info = inspect(cfg.data.path, check_values=True, rank=grid.rank, nranks=grid.size,
                       nonzero_targets=cfg.model.loss == "rel_l2")
    elif cfg.model.loss == "rel_l2" and info.task == "regression":
        inspect(cfg.data.path, check_values=True, rank=grid.rank, nranks=grid.size, nonzero_targets=True)
    spec = modelspec.from_config(cfg.model, cfg.source)
    check_task(cfg, spec, info)
    if spec.mlp and info.features != cfg.model.layers[0]:
        raise ConfigError(f"{cfg.source}: model.layers[0] = {cfg.model.layers[0]} but {cfg.data.path} has "
                          f"{info.features} features")
    if not spec.mlp and info.features != math.prod(spec.input):
        raise ConfigError(f"{cfg.source}: model.input = {list(spec.input)} holds {math.prod(spec.input)} values "
                          f"per sample but {cfg.data.path} has {info.features} features")

    global_batch = info.sizes["train"] if cfg.data.batch_size == "all" else cfg.data.batch_size
    if global_batch > info.sizes["train"]:
        raise ConfigError(f"{cfg.source}: data.batch_size = {global_batch} is larger than the "
                          f"{info.sizes['train']} training samples of {cfg.data.path}")
    if global_batch % grid.dp:
        raise ConfigError(f"{cfg.source}: data.batch_size = {global_batch} does not divide among "
                          f"parallel.dp = {grid.dp} ranks")
    if resume not in (None, "auto") and not os.path.exists(resume):
        raise DataError(f"{resume}: no such checkpoint")
    nearest = os.path.abspath(out_dir)  # the directory itself, or the closest ancestor that exists
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest) or not os.access(nearest, os.W_OK):
        raise ConfigError(f"{out_dir}: cannot create the run directory here (run.out_dir)")
    return info, global_batch


def check_task(cfg: config.JobConfig, spec: modelspec.Spec, info) -> None:
    """The model, the loss and the data file's task agree: classes against a vector of at least as many
    outputs, regression targets against as many outputs (any shape) and a regression loss."""
    src, path, loss = cfg.source, cfg.data.path, cfg.model.loss
    if not spec.mlp and len(info.x_shape) > 1 and tuple(info.x_shape) != tuple(spec.input):
        raise DataError(f"{path}: /train/x has samples of shape {list(info.x_shape)} but model.input is "
                        f"{list(spec.input)}")
    if cfg.data.normalize_targets and info.task != "regression":
        raise ConfigError(f"{src}: data.normalize_targets = true applies to regression targets; {path} holds "
                          f"class labels")
    if info.task == "regression":
        if loss not in losses.REGRESSION:
            raise ConfigError(f"{src}: model.loss = \"{loss}\" needs class labels but {path} holds regression "
                              f"targets: use one of {', '.join(losses.REGRESSION)}")
        outputs = math.prod(spec.output)
        if outputs != info.targets:
            raise ConfigError(f"{src}: the model outputs {outputs} values per sample ({list(spec.output)}) but "
                              f"{path} has {info.targets} targets per sample ({list(info.y_shape)})")
        return
    if loss not in losses.CLASSIFICATION:
        raise ConfigError(f"{src}: model.loss = \"{loss}\" needs regression targets but {path} holds class labels: "
                          f"use one of {', '.join(losses.CLASSIFICATION)}")
    if len(spec.output) != 1:
        raise ConfigError(f"{src}: the model's output has shape {list(spec.output)} per sample; the loss "
                          f"needs [outputs] (end with a flatten, global_avgpool or dense layer)")
    if spec.output[0] < info.classes:
        what = "model.layers[-1]" if spec.mlp else "the last layer's output"
        raise ConfigError(f"{src}: {what} = {spec.output[0]} outputs but {path} has {info.classes} classes")


def take_run_dir(out_dir: str, resume: str | None, is_root: bool):
    """Rank 0: lock the run directory (making it if needed), then check, under the lock, that a fresh
    run does not land on an old one and that checkpoints can be written. (lock, notes); (None, []) on
    the other ranks. Runs through comm.agree: a refusal is one line on every rank."""
    if not is_root:
        return None, []
    rundir.check_not_foreign(out_dir)
    lock, notes = rundir.acquire(out_dir)
    try:
        if resume is None and (checkpoint.list_checkpoints(out_dir)
                               or os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
            raise ConfigError(f"{out_dir}: already holds a run; resume it with --resume auto, or set "
                              f"run.out_dir (or run.name) to a new directory")
        rundir.check_writable(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock, notes


# Config keys a checkpoint must agree on to be resumed (others, e.g. lr or steps, may change); a
# model.layer list is compared as a whole (modelspec.describe).
RESUME_KEYS = (("model", "layers"), ("model", "activation"), ("model", "loss"), ("model", "dtype"),
               ("optimizer", "name"))


def load_for_resume(comm: MPI.Comm, out_dir: str, resume: str):
    """(checkpoint, its path, notes) to resume from; (None, None, notes) to start fresh. Collective.

    `auto`: the newest checkpoint of the run directory that verifies, with one note per file passed
    over; a PATH must verify or the run fails with its one-line reason.
    """
    if resume != "auto":
        return checkpoint.read(resume, comm), resume, []
    candidates = comm.bcast([p for _, p in reversed(checkpoint.list_checkpoints(out_dir))]
                            if comm.Get_rank() == 0 else None)
    notes = []
    for path in candidates:
        try:
            return checkpoint.read(path, comm), path, notes
        except DataError as e:  # raised on every rank alike
            notes.append(f"skipping {e}")
    notes.append(f"no valid checkpoint in {out_dir}: starting from step 0")
    return None, None, notes


def check_resumable(cfg: config.JobConfig, path: str, ckpt: checkpoint.Checkpoint,
                    force: bool) -> tuple[list[str], bool]:
    """Raise ConfigError naming the first key that differs in a way that matters (unless force).
    Returns (notes, whether the optimizer state loads)."""
    old = config.from_toml_text(ckpt.attrs["config"], path)
    notes = []
    was, now = modelspec.from_config(old.model, path), modelspec.from_config(cfg.model, cfg.source)
    keys = RESUME_KEYS
    if not (was.mlp and now.mlp):
        keys = RESUME_KEYS[2:]
        if was.describe() != now.describe():
            msg = f"{path}: the checkpoint's model differs from the job's: {modelspec.difference(was, now)}"
            if not force:
                raise ConfigError(msg + " (use --resume-force to resume anyway)")
            notes.append(msg + " (--resume-force)")
    for section, key in keys:
        a, b = getattr(old.section(section), key), getattr(cfg.section(section), key)
        if a != b:
            msg = (f"{path}: checkpoint has {section}.{key} = {config._fmt(a)} but the job has "
                   f"{config._fmt(b)}")
            if not force:
                raise ConfigError(msg + " (use --resume-force to resume anyway)")
            notes.append(msg + " (--resume-force)")
    load_state = True
    if ckpt.attrs.get("optimizer") == cfg.optimizer.name:  # the same optimizer: are its state arrays there?
        need = set(optim.build(cfg.optimizer, [(0, 1)], source=cfg.source).state_spec())
        have = set(ckpt.optim)
        if not need <= have:
            msg = (f"{path}: the checkpoint's {cfg.optimizer.name} state has {', '.join(sorted(have)) or 'none'}, "
                   f"the job's needs {', '.join(sorted(need))} (an optimizer option changed, e.g. optimizer.amsgrad)")
            if not force:
                raise ConfigError(msg + ": resume with the checkpoint's options, or --resume-force to start the "
                                  "optimizer state fresh")
            notes.append(msg + ": the optimizer state starts fresh (--resume-force)")
            load_state = False
    return notes, load_state


class Trainer:
    def __init__(self, cfg: config.JobConfig, grid: Grid, out_dir: str, quiet: bool = False,
                 resume: str | None = None, resume_force: bool = False, signals: "StopSignals | None" = None,
                 data=None):
        """data: a data.shared.NodeData of cfg.data.path (a sweep's trials share it) or None (read the file)."""
        self.cfg, self.grid, self.out_dir, self.quiet = cfg, grid, out_dir, quiet
        world = grid.world
        fingerprint.STATE.enabled = cfg.run.check_collectives  # before the first collective, on every rank
        self.watch = NullWatchdog()
        self.data = data if data is not None and data.path == cfg.data.path else None
        self.loader = self.test = None
        self.info, self.global_batch = agree(world, prepare, cfg, grid, out_dir, resume,
                                             self.data.info if self.data else None)
        self.lock, self.notes = agree(world, take_run_dir, out_dir, resume, grid.is_root)
        try:
            # a thread per rank that names a stalled rank (docs/diagnosis.md); idle outside fit()
            self.watch = Watchdog(world, out_dir, cfg.run.stall_timeout_s, cfg.run.on_stall, grid.traced())
            with self.watch.phase("start-up"):
                self._start(cfg, grid, out_dir, resume, resume_force)
        except BaseException:
            self.release()
            raise
        self.signals = signals or StopSignals()
        self.last_ckpt_time = time.monotonic()
        self.restart_agreements()   # checkpoint_due's agreements (fit restarts them)
        self.last_record: dict = {}   # the last metrics line (loss, and the test scores where evaluated)

    def _start(self, cfg, grid, out_dir, resume, resume_force) -> None:
        """Under the lock: the strategy, the data, and the checkpoint to resume from. The run directory's
        config.toml is written only once all of it succeeded (a failed resume changes nothing)."""
        world = grid.world
        ckpt = resume_path = None
        if resume is not None:
            ckpt, resume_path, notes = load_for_resume(world, out_dir, resume)
            self.notes += notes
        load_state = True
        if ckpt is not None:
            notes, load_state = agree(world, check_resumable, cfg, resume_path, ckpt, resume_force)
            self.notes += notes
        self.strategy = agree(world, parallel.build, cfg, grid, self.global_batch)  # must not communicate
        dtype = self.strategy.dtype
        d = cfg.data
        scale = agree(world, read_stats, d.path) if d.normalize_targets else None
        self.strategy.partition.target_scale = scale
        shared = self.data.arrays if self.data else {}
        self.loader = ShardedLoader(d.path, "train", self.global_batch, grid.dp_rank, grid.dp, cfg.run.seed, dtype,
                                    d.shuffle, d.window_chunks, d.read_ahead, scale, arrays=shared.get("train"))
        self.test = ShardedLoader(cfg.data.path, "test", 1, 0, 1, cfg.run.seed, dtype, arrays=shared.get("test"))
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.loader.steps_per_epoch
        s = cfg.schedule
        base = s.base_batch_size or self.global_batch // grid.dp
        self.lr_scale = self.global_batch / base if s.scale_lr_with_batch else 1.0
        self.base_lr = optim.base_lr(cfg.optimizer)  # resolved once, from the config; the schedule starts here
        self.step_count = 0      # global steps done (0-based index of the next step)
        self.opt_steps = 0       # optimizer updates applied (steps minus skipped ones)
        self.skipped = 0         # steps skipped for a non-finite gradient
        self.row_losses: list = []  # run.reproducible: each step's per-row losses since the last log
        self.resumed_from = None
        if ckpt is not None:
            self.notes += agree(world, self.strategy.restore, resume_path, ckpt, load_state)
            self.restore_position(resume_path, ckpt)
            ckpt.release()
        if grid.is_root and self.step_count < self.total_steps:  # a finished run stays as it was
            rundir.write_config(out_dir, config.to_toml(cfg))

    def release(self) -> None:
        """Give the run directory back (rank 0; also after a failed start), stop the watchdog and close
        the data files."""
        self.watch.stop()
        self.watch = NullWatchdog()
        for loader in (self.loader, self.test):
            if loader is not None:
                loader.close()
        self.loader = self.test = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def set_hyperparameters(self, cfg: config.JobConfig) -> None:
        """Continue with other optimizer/schedule values (population-based training copies a member's
        state, then changes them): the lr schedule and the optimizer's hyperparameters, state kept.
        The optimizer's name and what its state holds must not change."""
        self.cfg = cfg
        self.base_lr = optim.base_lr(cfg.optimizer)
        self.strategy.set_optimizer(cfg.optimizer)

    # -- one step --------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.cfg.schedule, self.cfg.schedule.total_steps or self.total_steps,
                     self.lr_scale)

    def step(self) -> tuple[float, float, float]:
        """One global step. Returns (this rank's loss sum, lr, gradient norm)."""
        x, labels = self.loader.batch(self.step_count)
        lr = self.lr(self.step_count)
        r = self.strategy.step(x, labels, self.opt_steps + 1, lr)
        loss_sum, norm = r.loss_sum, r.grad_norm
        if r.rows is not None:  # run.reproducible: summed exactly at the next logged step
            self.row_losses.append(r.rows)
        if r.applied:
            self.opt_steps += 1
        else:
            self.skipped += 1
            if self.cfg.optimizer.on_nonfinite == "stop":  # every rank saw the same norm: all stop
                err = NonFiniteError(f"step {self.step_count}: non-finite gradient norm ({norm}); "
                                     f"optimizer.on_nonfinite = \"stop\"")
                err.all_ranks = True
                raise err
        self.step_count += 1
        return loss_sum, lr, norm

    def evaluate(self) -> dict:
        """The test split's metrics (losses.summarise: test_loss and test_acc, or test_rel_l2 and test_r2
        for regression); each dp replica takes a contiguous share."""
        with self.watch.phase("evaluate"):
            return self._evaluate()

    def _evaluate(self) -> dict:
        n = self.test.n
        self.strategy.prepare_evaluate()
        lo, hi = n * self.grid.dp_rank // self.grid.dp, n * (self.grid.dp_rank + 1) // self.grid.dp
        regression = self.info.task == "regression"
        width = 3 + 2 * self.info.targets if regression else 2
        totals, rows = np.zeros(width), []
        for start in range(lo, hi, 4096):
            x, y = self.test.slice(start, min(hi, start + 4096))
            part = self.strategy.evaluate(x, y)
            if part is not None and self.cfg.run.reproducible:
                rows.append(part)   # each row's terms
            elif part is not None:
                totals += part
        if self.cfg.run.reproducible:  # the rows' terms summed exactly: the same bits on any layout
            from .parallel.reprosum import exact_colsums

            totals = exact_colsums(np.concatenate(rows) if rows else np.empty((0, width)), self.grid.world, terms=n)
        else:
            self.grid.world.Allreduce(MPI.IN_PLACE, totals)  # contributions sum over the world
        return losses.summarise(totals, n, regression)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, until: int | None = None, hooks=None) -> Summary:
        """Train to the last step (or to step `until`: population-based training's intervals; evaluated
        there, no checkpoint unless it is the last step). hooks (a sweep's): after_step(trainer) after
        every step, after_eval(trainer, step, record) -> True to stop here (a pruned trial); both are
        called on every rank of the run."""
        cfg, root = self.cfg, self.grid.is_root
        stop_at = self.total_steps if until is None else min(until, self.total_steps)
        self.signals.install()  # from the first line of `hpcopt train` on; kept until the process exits
        self.restart_agreements()
        if self.step_count >= self.total_steps:  # a finished run, resumed: nothing to do, nothing rewritten
            if root:
                for note in self.notes:
                    print(f"hpcopt: {note}", file=sys.stderr, flush=True)
            return Summary(0, 0.0, 0.0, float("nan"), float("nan"), self.out_dir, self.resumed_from,
                           finished_at=self.step_count)
        log = MetricsLog(self.out_dir) if root else None
        slurm = slurm_fields()
        if root:
            for note in self.notes:
                print(f"hpcopt: {note}", file=sys.stderr, flush=True)
            log.write(dict(event="start", step=self.step_count, world=self.grid.size,
                           resumed_from=self.resumed_from, **slurm))
        bar = Progress(self.total_steps, self.step_count, quiet=self.quiet or not root)
        watch = self.watch
        watch.set_phase("start-up")  # until the first step completes (kernels compile, data loads)
        fingerprint.STATE.step = self.step_count
        every, eval_every = cfg.run.log_every, cfg.run.eval_every
        t0 = t_last = time.perf_counter()
        steps_at_last, start_step = self.step_count, self.step_count
        scores: dict = {}
        loss_acc = 0.0
        stopped_by = None
        path = None
        try:
            while self.step_count < stop_at:
                loss_sum, lr, norm = self.step()
                watch.beat(self.step_count)
                loss_acc += loss_sum
                done = self.step_count
                if done == start_step + 1 and root:
                    log.write(dict(event="first_step", step=done,
                                   start_to_first_step_s=time.time() - process_start_time(), **slurm))
                last = done == stop_at
                pruned = False
                if done % every == 0 or last:
                    n_rows = self.global_batch * (done - steps_at_last)
                    if cfg.run.reproducible:  # every row's loss, summed exactly: the same bits on any layout
                        from .parallel.reprosum import exact_sum

                        rows = np.concatenate(self.row_losses) if self.row_losses else np.empty(0)
                        self.row_losses.clear()
                        loss = exact_sum(rows, self.grid.world, terms=n_rows) / n_rows
                    else:
                        loss = self.grid.world.allreduce(loss_acc) / n_rows
                    now = time.perf_counter()
                    rec = dict(step=done, epoch=self.loader.position(done - 1)[0], loss=loss, lr=lr,
                               grad_norm=norm, skipped=self.skipped,
                               samples_per_s=self.global_batch * (done - steps_at_last) / (now - t_last),
                               time=now - t0, **slurm)
                    rec.update(self.strategy.extra_metrics())
                    evaluated = (eval_every and done % eval_every == 0) or last
                    if evaluated:
                        scores = self.evaluate()
                        rec.update(scores)
                    self.last_record = rec
                    if root:
                        log.write(rec)
                        fields = dict(loss=f"{loss:.4f}")
                        if "test_acc" in rec:
                            fields["acc"] = f"{100 * rec['test_acc']:.1f}%"
                        if "test_rel_l2" in rec:
                            fields["rel_l2"] = f"{rec['test_rel_l2']:.4f}"
                        bar.advance(done - steps_at_last, fields)
                    t_last, steps_at_last, loss_acc = time.perf_counter(), done, 0.0
                    if hooks is not None and evaluated and not last:
                        pruned = hooks.after_eval(self, done, rec)
                if hooks is not None:
                    hooks.after_step(self)
                if pruned:
                    stopped_by = "pruned"
                    break
                if last:
                    break
                reason = self.checkpoint_due()
                if reason:
                    t_sig = self.signals.received_at
                    path = self.save()
                    if root:
                        rec = dict(event="checkpoint", step=done, reason=reason, path=path, **slurm)
                        if reason.startswith("signal"):
                            rec["signal_to_commit_s"] = time.time() - t_sig
                        log.write(rec)
                    if reason.startswith("signal"):
                        stopped_by = reason
                        break
            seconds = time.perf_counter() - t0
            if stopped_by is None and self.step_count == self.total_steps:
                path = self.save()
        finally:
            watch.set_phase("idle")
            bar.close()
            if log:
                log.close()
        steps = self.step_count - start_step
        nan = float("nan")
        return Summary(steps, seconds, self.global_batch * steps / max(seconds, 1e-9), scores.get("test_acc", nan),
                       scores.get("test_loss", nan), self.out_dir, path, stopped_by,
                       test_rel_l2=scores.get("test_rel_l2"), test_r2=scores.get("test_r2"))

    def checkpoint_due(self) -> str | None:
        """All ranks agree whether to checkpoint after this step, and why (called after every step).

        every_steps is known to every rank alike; a signal, which may reach the ranks at different
        steps, and every_seconds (rank 0's clock) need an agreement: one tiny Allreduce (MAX: the first
        signal wins everywhere), made every `agree_every` steps so that it costs a fast step little:
        rank 0 proposes the next interval, AGREE_S of its recent steps (at most AGREE_MAX), in the same
        Allreduce, so every rank knows the next agreement's step. A signal is acted on within AGREE_S."""
        c = self.cfg.checkpoint
        step_due = bool(c.every_steps) and self.step_count % c.every_steps == 0
        if self.step_count < self.next_agree and not step_due:
            return None
        flags = np.zeros(4, dtype=np.int32)  # [signal number seen, time due (rank 0), step due, next interval]
        flags[0] = self.signals.received
        if self.grid.is_root:
            now = time.monotonic()
            if c.every_seconds:
                flags[1] = now - self.last_ckpt_time >= c.every_seconds
            steps = self.step_count - self.agreed_at[0]
            per_step = (now - self.agreed_at[1]) / steps if steps > 0 else AGREE_S
            flags[3] = min(max(int(AGREE_S / max(per_step, 1e-9)), 1), AGREE_MAX)
        flags[2] = step_due
        fingerprint.post_digests()   # run.check_collectives: each communicator's calls since the last agreement
        self._agree(flags)
        self.agreed_at = (self.step_count, time.monotonic())
        self.next_agree = self.step_count + int(flags[3])
        if flags[0]:
            self.signals.received = int(flags[0])
            if not self.signals.received_at:
                self.signals.received_at = time.time()
            return f"signal {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return "every_seconds"
        if flags[2]:
            return "every_steps"
        return None

    def restart_agreements(self) -> None:
        """checkpoint_due agrees at the next step, then measures its intervals from here (a loop of steps
        begins: fit, or a benchmark stepping the Trainer itself)."""
        self.next_agree, self.agreed_at = self.step_count, (self.step_count, time.monotonic())

    def _agree(self, flags: np.ndarray) -> None:
        self.grid.world.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_attrs(self) -> dict:
        epoch, batch = self.loader.position(self.step_count)
        g = self.grid
        return dict(step=self.step_count, epoch=epoch, batch_in_epoch=batch, seed=self.cfg.run.seed,
                    opt_steps=self.opt_steps, skipped=self.skipped, lr=self.lr(max(self.step_count - 1, 0)),
                    config=config.to_toml(self.cfg), world=np.array([g.dp, g.pp, g.tp], dtype=np.int64),
                    optimizer=self.cfg.optimizer.name, strategy=self.strategy.name,
                    model=modelspec.from_config(self.cfg.model, self.cfg.source).describe())

    def save(self) -> str:
        """Checkpoint at the current step: every rank writes its rows of one file (parallel HDF5)."""
        path = os.path.join(self.out_dir, "checkpoints", checkpoint.file_name(self.step_count))
        with self.watch.phase("checkpoint"):
            checkpoint.write_parallel(path, self.grid.world, self.strategy.checkpoint_pieces(),
                                      self.checkpoint_attrs())
            if self.grid.is_root:
                checkpoint.prune(self.out_dir, self.cfg.checkpoint.keep)
        self.last_ckpt_time = time.monotonic()
        return path

    def restore_position(self, path: str, ckpt: checkpoint.Checkpoint) -> None:
        """The step counters; the data position follows from the step (counter-based loader)."""
        self.step_count = int(ckpt.attrs["step"])
        self.opt_steps = int(ckpt.attrs.get("opt_steps", self.step_count))
        self.skipped = int(ckpt.attrs.get("skipped", 0))
        self.resumed_from = path
        self.notes.append(f"resuming from {path} at step {self.step_count}")


def slurm_fields(env=os.environ) -> dict:
    """Slurm's job id and restart count, recorded with the metrics when running under Slurm."""
    if "SLURM_JOB_ID" not in env:
        return {}
    return dict(slurm_job_id=env["SLURM_JOB_ID"], slurm_restart_count=int(env.get("SLURM_RESTART_COUNT", 0)))
