"""The Trainer: one step reads top to bottom (DESIGN §1).

    step: loader -> model.loss_and_grad -> strategy.sync_grads -> clip/check -> optimizer.step -> metrics
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from . import checkpoint, config, optim
from .comm import Grid, agree
from .data import ShardedLoader, inspect
from .errors import ConfigError, NonFiniteError
from .metrics import MetricsLog, Progress
from .nn import MLP
from .optim.clip import clip_and_check
from .optim.schedules import lr_at
from .parallel.data import DataParallel


@dataclass
class Summary:
    steps: int
    seconds: float
    samples_per_s: float
    test_accuracy: float
    test_loss: float
    out_dir: str
    checkpoint: str

    def line(self) -> str:
        return (f"done: {self.steps} steps in {self.seconds:.1f} s, {self.samples_per_s:,.0f} samples/s, "
                f"test accuracy {100 * self.test_accuracy:.2f}%, run directory {self.out_dir}")


def prepare(cfg: config.JobConfig, grid: Grid, out_dir: str, resume: str | None):
    """Start-up checks that every rank runs before any collective: data file and run directory.

    Raises a user error with one line; called through comm.agree so all ranks leave together.
    """
    if grid.pp > 1 or grid.tp > 1:
        raise ConfigError(f"{cfg.source}: parallel.pp/tp > 1 (pipeline and tensor parallel) are not available yet")
    if cfg.parallel.strategy != "data":
        raise ConfigError(f"{cfg.source}: parallel.strategy = \"{cfg.parallel.strategy}\" is not available yet "
                          f"(available: data)")
    info = inspect(cfg.data.path, check_values=True, rank=grid.rank, nranks=grid.size)
    if info.features != cfg.model.layers[0]:
        raise ConfigError(f"{cfg.source}: model.layers[0] = {cfg.model.layers[0]} but {cfg.data.path} has "
                          f"{info.features} features")
    if cfg.model.layers[-1] < info.classes:
        raise ConfigError(f"{cfg.source}: model.layers[-1] = {cfg.model.layers[-1]} outputs but "
                          f"{cfg.data.path} has {info.classes} classes")
    global_batch = info.sizes["train"] if cfg.data.batch_size == "all" else cfg.data.batch_size
    if global_batch > info.sizes["train"]:
        raise ConfigError(f"{cfg.source}: data.batch_size = {global_batch} is larger than the "
                          f"{info.sizes['train']} training samples of {cfg.data.path}")
    if global_batch % grid.dp:
        raise ConfigError(f"{cfg.source}: data.batch_size = {global_batch} does not divide among "
                          f"parallel.dp = {grid.dp} ranks")
    if resume is None and os.path.isdir(out_dir) and (
            checkpoint.list_checkpoints(out_dir) or os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
        raise ConfigError(f"{out_dir}: already holds a run; resume it with --resume auto, or set "
                          f"run.out_dir (or run.name) to a new directory")
    return info, global_batch


class Trainer:
    def __init__(self, cfg: config.JobConfig, grid: Grid, out_dir: str, quiet: bool = False,
                 resume: str | None = None):
        self.cfg, self.grid, self.out_dir, self.quiet = cfg, grid, out_dir, quiet
        self.info, self.global_batch = agree(grid.world, prepare, cfg, grid, out_dir, resume)
        if grid.is_root:
            make_run_dir(cfg, out_dir)
        m = cfg.model
        self.model = MLP(m.layers, m.activation, m.loss, m.dtype, seed=cfg.run.seed, init=m.init)
        self.flat = self.model.flat
        self.opt = optim.build(cfg.optimizer, self.flat.segments(), device=cfg.backend.device)
        self.opt_state = self.opt.init_state(self.flat.size)
        self.loader = ShardedLoader(cfg.data.path, "train", self.global_batch, grid.dp_rank, grid.dp,
                                    cfg.run.seed, self.model.dtype)
        self.test = ShardedLoader(cfg.data.path, "test", 1, 0, 1, cfg.run.seed, self.model.dtype)
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.loader.steps_per_epoch
        self.strategy = DataParallel(grid.dp_comm)
        s = cfg.schedule
        base = s.base_batch_size or self.global_batch // grid.dp
        self.lr_scale = self.global_batch / base if s.scale_lr_with_batch else 1.0
        self.step_count = 0      # global steps done (0-based index of the next step)
        self.opt_steps = 0       # optimizer updates applied (steps minus skipped ones)
        self.skipped = 0         # steps skipped for a non-finite gradient

    # -- one step --------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        return lr_at(step, self.opt.hp.lr, self.cfg.schedule, self.cfg.schedule.total_steps or self.total_steps,
                     self.lr_scale)

    def step(self) -> tuple[float, float, float]:
        """One global step. Returns (this rank's loss sum, lr, gradient norm)."""
        x, labels = self.loader.batch(self.step_count)
        loss_sum = self.model.loss_and_grad(x, labels, self.global_batch)
        self.strategy.sync_grads(self.flat.grad)
        o = self.cfg.optimizer
        norm, finite = clip_and_check(self.flat.grad, o.clip_norm, o.clip_value)
        lr = self.lr(self.step_count)
        if finite:
            self.opt_steps += 1
            self.opt.step(self.flat.data, self.flat.grad, self.opt_state, self.opt_steps, lr)
        else:
            self.skipped += 1
            if o.on_nonfinite == "stop":  # the reduced gradient is the same on every rank: all stop
                err = NonFiniteError(f"step {self.step_count}: non-finite gradient norm ({norm}); "
                                     f"optimizer.on_nonfinite = \"stop\"")
                err.all_ranks = True
                raise err
        self.step_count += 1
        return loss_sum, lr, norm

    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split; each dp rank takes a contiguous share."""
        n = self.test.n
        lo, hi = n * self.grid.dp_rank // self.grid.dp, n * (self.grid.dp_rank + 1) // self.grid.dp
        loss_sum, correct = 0.0, 0
        for start in range(lo, hi, 4096):
            x, y = self.test.slice(start, min(hi, start + 4096))
            ls, c = self.model.evaluate(x, y)
            loss_sum, correct = loss_sum + ls, correct + c
        totals = np.array([loss_sum, correct], dtype=np.float64)
        self.strategy.comm.Allreduce(MPI.IN_PLACE, totals)
        return totals[0] / n, totals[1] / n

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> Summary:
        cfg, root = self.cfg, self.grid.is_root
        log = MetricsLog(self.out_dir) if root else None
        bar = Progress(self.total_steps, self.step_count, quiet=self.quiet or not root)
        every, eval_every = cfg.run.log_every, cfg.run.eval_every
        t0 = t_last = time.perf_counter()
        steps_at_last, start_step = self.step_count, self.step_count
        acc, test_loss = float("nan"), float("nan")
        loss_acc = 0.0
        try:
            while self.step_count < self.total_steps:
                loss_sum, lr, norm = self.step()
                loss_acc += loss_sum
                done = self.step_count
                last = done == self.total_steps
                if done % every == 0 or last:
                    loss = self.strategy.comm.allreduce(loss_acc) / (self.global_batch * (done - steps_at_last))
                    now = time.perf_counter()
                    rec = dict(step=done, epoch=self.loader.position(done - 1)[0], loss=loss, lr=lr,
                               grad_norm=norm, skipped=self.skipped,
                               samples_per_s=self.global_batch * (done - steps_at_last) / (now - t_last),
                               time=now - t0)
                    if (eval_every and done % eval_every == 0) or last:
                        test_loss, acc = self.evaluate()
                        rec.update(test_loss=test_loss, test_acc=acc)
                    if root:
                        log.write(rec)
                        fields = dict(loss=f"{loss:.4f}")
                        if "test_acc" in rec:
                            fields["acc"] = f"{100 * acc:.1f}%"
                        bar.advance(done - steps_at_last, fields)
                    t_last, steps_at_last, loss_acc = time.perf_counter(), done, 0.0
            seconds = time.perf_counter() - t0
            path = self.save()
        finally:
            bar.close()
            if log:
                log.close()
        steps = self.step_count - start_step
        return Summary(steps, seconds, self.global_batch * steps / max(seconds, 1e-9), acc, test_loss,
                       self.out_dir, path)

    # -- checkpoints ---------------------------------------------------------------------------
    def snapshot(self) -> checkpoint.Checkpoint:
        f = self.flat
        params = {k: f.param(k).copy() for k in f.keys()}
        optim_state = {s: {k: f.view_of(a, k).copy() for k in f.keys()} for s, a in self.opt_state.items()}
        epoch, batch = self.loader.position(self.step_count)
        g = self.grid
        attrs = dict(step=self.step_count, epoch=epoch, batch_in_epoch=batch, seed=self.cfg.run.seed,
                     opt_steps=self.opt_steps, skipped=self.skipped, lr=self.lr(max(self.step_count - 1, 0)),
                     config=config.to_toml(self.cfg), world=np.array([g.dp, g.pp, g.tp], dtype=np.int64),
                     optimizer=self.opt.name)
        return checkpoint.Checkpoint(params, optim_state, attrs)

    def save(self) -> str:
        """Checkpoint at the current step (data parallel: every replica holds it all; rank 0 writes)."""
        path = os.path.join(self.out_dir, "checkpoints", checkpoint.file_name(self.step_count))
        if self.grid.is_root:
            checkpoint.write(path, self.snapshot())
            checkpoint.prune(self.out_dir, self.cfg.checkpoint.keep)
        self.grid.world.Barrier()
        return path


def make_run_dir(cfg: config.JobConfig, out_dir: str) -> None:
    """Rank 0: create the run directory and write the resolved config."""
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    tmp = os.path.join(out_dir, "config.toml.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_toml(cfg))
    os.replace(tmp, os.path.join(out_dir, "config.toml"))
