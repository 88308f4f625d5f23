"""Parallel strategies: how one global step's gradients and parameters move between ranks.

`parallel.strategy` names one (names.STRATEGIES); `build` checks the layout rules once
(config.validate_layout) and composes the strategy from parts (strategy.py):

    strategy    partition                executor             exchange                    update over
    data        whole model              Sequential (1)       BucketedExchange + codec    the replica
    data+zero   whole model              Sequential (1)       BucketedExchange + R-S      this rank's shard
    tensor      tp blocks                Sequential (M)       BucketedExchange            the partition
    pipeline    a stage                  PipelineExecutor     BucketedExchange            the partition
    hybrid      a stage of tp blocks     PipelineExecutor     BucketedExchange            the partition
    local_sgd   whole model              Sequential (mean)    Averaging                   the replica
    async       whole model              Sequential (mean)    (its own server protocol)   server: all

run.reproducible = true (reproducible.py) swaps parts: Sequential with its fixed-order kernels, and
    data        GatheredGradients (dW gathered in backward)         the replica
    data+zero   ShardGather (the same, then the shards gathered)    this rank's shard
    pipeline    GatheredGradients (dW from all micro-batches' rows    the partition
                at the last backward, MicroBatched)
    local_sgd   Averaging(exact=True)                               the replica
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import config, names
from ..config import JobConfig

if TYPE_CHECKING:  # the package imports no MPI, numpy or numba until a strategy is built
    from ..comm import Grid


def build(cfg: JobConfig, grid: "Grid", global_batch: int):
    """The strategy of cfg.parallel.strategy for this grid. Raises ConfigError (from the rule tables)
    for a layout that cannot run; allocates buffers but does not communicate (it runs in comm.agree)."""
    config.validate_layout(cfg, grid.dp, grid.pp, grid.tp, global_batch)
    check_device(cfg)
    check_memory(cfg, grid)
    if cfg.run.reproducible:
        from .. import modelspec
        from .reproducible import check

        check(cfg, modelspec.from_config(cfg.model, cfg.source))
    return COMPOSE[cfg.parallel.strategy](cfg, grid, global_batch)


def check_device(cfg: JobConfig) -> None:
    """backend.device = "cuda" needs a GPU that numba.cuda sees (or its simulator, NUMBA_ENABLE_CUDASIM=1)."""
    if cfg.backend.device != "cuda":
        return
    try:
        from numba import cuda

        ok = cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA installation is the same answer: no GPU to use
        ok = False
    if not ok:
        raise config.ConfigError(f"{cfg.source}: backend.device = \"cuda\" but numba.cuda finds no usable GPU "
                                 f"(driver and CUDA toolkit installed?); use backend.device = \"cpu\"")


def check_memory(cfg: JobConfig, grid: "Grid", available: int | None = None) -> None:
    """The model's buffers on one rank (parameters, gradients, optimizer state) must fit the memory the
    node has free: refused with the numbers, before any allocation, rather than a MemoryError."""
    from .. import optim

    from .. import modelspec

    n = modelspec.from_config(cfg.model, cfg.source).n_params()           # the whole model's parameters
    per_rank = n / (grid.pp * grid.tp)                                   # a stage of tp blocks, roughly
    states = len(optim.build(cfg.optimizer, [(0, 1)], source=cfg.source).state_spec())
    item = 8 if cfg.model.dtype == "float64" else 4
    need = per_rank * (2 * item + 4 * states)                           # data + grad + float32 state arrays
    if available is None:
        available = _mem_available()
    if available is not None and need > available:
        raise config.ConfigError(f"{cfg.source}: the model needs {need / 2**30:,.1f} GiB per rank "
                                 f"({n:,} parameters, gradients and {states} optimizer state arrays), more than "
                                 f"the {available / 2**30:,.1f} GiB this node has free")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def n_units(cfg: JobConfig) -> int:
    """The model's top-level layers (a pipeline stage holds a run of them)."""
    from .. import modelspec

    return len(modelspec.from_config(cfg.model, cfg.source).units)


def _update(cfg: JobConfig, params, grads, segments, **kw):
    from .update import Update

    return Update(cfg.optimizer, params, grads, segments, device=cfg.backend.device, source=cfg.source, **kw)


def _replicas(cfg: JobConfig, grid: "Grid", global_batch: int):
    """data: each dp rank a whole replica; gradients summed by buckets (optionally compressed), or
    reduce-scattered into ZeRO-1 shards."""
    from . import compress
    from .data import BucketedExchange
    from .partition import Partition
    from .strategy import Sequential, Strategy

    p, comm = cfg.parallel, grid.dp_comm
    part = Partition(cfg, grid, 0, n_units(cfg))
    f = part.flat
    if cfg.run.reproducible:   # gradients summed in a fixed order inside backward; no bucket exchange
        from .reproducible import GatheredGradients, NormSums, Reproducible

        repro = Reproducible(comm)
        executor = Sequential(part, 1, global_batch // grid.dp, global_batch, repro=repro)
        if p.zero:  # each rank updates its shard of the global gradient it holds, then all gather
            from .reproducible import ShardGather
            from .zero import Shard

            shard = Shard(f, comm, own_grad=False)
            norm = NormSums(f.segments())   # over the whole gradient every rank holds
            update = _update(cfg, shard.params, f.grad[shard.lo:shard.hi], shard.segments(),
                             sum_sq=lambda grads, clip_value: norm(f.grad, clip_value))
            return Strategy("data", part, executor, ShardGather(repro, shard), update,
                            state_blocks=shard.blocks())
        update = _update(cfg, f.data, f.grad, f.segments(), sum_sq=NormSums(f.segments()))
        return Strategy("data", part, executor, GatheredGradients(repro), update)
    executor = Sequential(part, 1, global_batch // grid.dp, global_batch)
    unit_of = part.stage.unit_of
    if p.zero:
        from .zero import ReduceScatter, Shard

        shard = Shard(f, comm)
        update = _update(cfg, shard.params, shard.grad, shard.segments(), norm_comms=(comm,))
        exchange = BucketedExchange(f, comm, unit_of, 0, p.bucket_mb, p.overlap,
                                    lambda buckets: ReduceScatter(shard, buckets))
        return Strategy("data", part, executor, exchange, update, state_blocks=shard.blocks())
    codec = p.compression if comm.Get_size() > 1 else "none"
    exchange = BucketedExchange(f, comm, unit_of, 0, p.bucket_mb, p.overlap, lambda buckets: compress.build(
        codec, comm, [b.size for b in buckets], p.topk_density, f.dtype))
    return Strategy("data", part, executor, exchange, _update(cfg, f.data, f.grad, f.segments()))


def _model_parallel(cfg: JobConfig, grid: "Grid", global_batch: int):
    """pipeline, tensor, hybrid: this rank's stage of tp blocks, its dp replicas summed by buckets, the
    norm summed over tp and pp with replicated tensors counted once."""
    from . import compress
    from .data import BucketedExchange
    from .partition import Partition
    from .pipeline import PipelineExecutor, stage_bounds
    from .strategy import Sequential, Strategy

    p, name = cfg.parallel, cfg.parallel.strategy
    bounds = stage_bounds(cfg, grid.pp) if name != "tensor" else [(0, n_units(cfg))]
    lo, hi = bounds[grid.pp_rank]
    part = Partition(cfg, grid, lo, hi, bounds)
    f = part.flat
    micro_batch = global_batch // grid.dp // p.micro_batches
    if cfg.run.reproducible:   # the pipeline (reproducible.check refuses tensor and hybrid)
        from .reproducible import GatheredGradients, MicroBatched, NormSums, Reproducible

        repro = Reproducible(grid.dp_comm)
        executor = PipelineExecutor(part, grid.pp_comm, p.schedule, p.micro_batches, micro_batch, global_batch,
                                    repro=MicroBatched(repro, p.micro_batches, micro_batch))
        update = _update(cfg, f.data, f.grad, f.segments(), sum_sq=NormSums(f.segments(), grid.pp_comm))
        return Strategy(name, part, executor, GatheredGradients(repro), update)
    if name == "tensor":
        executor = Sequential(part, p.micro_batches, micro_batch, global_batch)
    else:
        executor = PipelineExecutor(part, grid.pp_comm, p.schedule, p.micro_batches, micro_batch, global_batch)
    exchange = BucketedExchange(f, grid.dp_comm, part.stage.unit_of, lo, p.bucket_mb,
                                p.overlap, lambda buckets: compress.build(
                                    "none", grid.dp_comm, [b.size for b in buckets], dtype=f.dtype))
    update = _update(cfg, f.data, f.grad, f.segments(), norm_comms=part.norm_comms(),
                     not_counted=part.not_counted())
    return Strategy(name, part, executor, exchange, update)


def _local_sgd(cfg: JobConfig, grid: "Grid", global_batch: int):
    from ..nn.stage import Stage
    from .local_sgd import Averaging
    from .partition import Partition
    from .strategy import Sequential, Strategy

    m, p, comm = cfg.model, cfg.parallel, grid.dp_comm
    part = Partition(cfg, grid, 0, n_units(cfg), sync_batch_stats=False)   # replicas step alone
    f, local_batch = part.flat, global_batch // grid.dp
    repro, kw = None, {}
    if cfg.run.reproducible:  # each replica's step in a fixed order (alone: no rows of other ranks)
        from mpi4py import MPI

        from .reproducible import NormSums, Reproducible

        repro = Reproducible(MPI.COMM_SELF)
        kw = dict(sum_sq=NormSums(f.segments()))
    update = _update(cfg, f.data, f.grad, f.segments(), agree_comm=comm, **kw)
    exchange = Averaging(f, comm, p.average_every, p.average_optimizer_state, lambda: update.state,
                         lambda: Stage(part.spec, 0, n_units(cfg), m.activation, m.loss, m.dtype, cfg.run.seed,
                                       m.init), part.stage.buffers, exact=repro is not None)
    return Strategy("local_sgd", part, Sequential(part, 1, local_batch, local_batch, repro=repro), exchange, update)


def _async(cfg: JobConfig, grid: "Grid", global_batch: int):
    from .async_ps import SERVER, AsyncParameterServer
    from .partition import Partition
    from .strategy import Sequential

    comm = grid.dp_comm
    part = Partition(cfg, grid, 0, n_units(cfg), sync_batch_stats=False)   # workers step alone
    f, local_batch = part.flat, global_batch // grid.dp
    update = _update(cfg, f.data, f.grad, f.segments(), keeps_state=comm.Get_rank() == SERVER)
    return AsyncParameterServer(part, Sequential(part, 1, local_batch, local_batch), update, comm,
                                cfg.parallel.max_staleness)


# parallel.strategy -> how it is composed (the names and their descriptions: names.STRATEGIES)
COMPOSE = {"data": _replicas, "pipeline": _model_parallel, "tensor": _model_parallel, "hybrid": _model_parallel,
           "local_sgd": _local_sgd, "async": _async}
assert set(COMPOSE) == set(names.STRATEGIES), "names.STRATEGIES lists what parallel.build composes"
