"""Parallel strategies: how one global step's gradients and parameters move between ranks.

`parallel.strategy` names one; `build` makes it. A strategy module is imported only when chosen.
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError

# parallel.strategy -> "module:Class"
STRATEGIES = {
    "data": "hpcopt.parallel.data:data_parallel",
    "local_sgd": "hpcopt.parallel.local_sgd:LocalSGD",
    "async": "hpcopt.parallel.async_ps:AsyncParameterServer",
    "pipeline": "hpcopt.parallel.pipeline:PipelineParallel",
    "tensor": "hpcopt.parallel.tensor:TensorParallel",
    "hybrid": "hpcopt.parallel.pipeline:Hybrid",
}


def build(cfg, grid, global_batch: int):
    """The strategy of cfg.parallel.strategy for this grid. Raises ConfigError for what is not built."""
    name = cfg.parallel.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"{cfg.source}: parallel.strategy = \"{name}\" is not available "
                          f"(available: {', '.join(STRATEGIES)})")
    if name not in ("pipeline", "tensor", "hybrid") and (grid.pp > 1 or grid.tp > 1):
        raise ConfigError(f"{cfg.source}: parallel.pp/tp > 1 need parallel.strategy = \"pipeline\", "
                          f"\"tensor\" or \"hybrid\"")
    if name == "pipeline" and grid.tp > 1:
        raise ConfigError(f"{cfg.source}: parallel.tp = {grid.tp} needs parallel.strategy = \"tensor\" or "
                          f"\"hybrid\" (\"pipeline\" splits only into parallel.pp stages)")
    if name == "tensor" and grid.pp > 1:
        raise ConfigError(f"{cfg.source}: parallel.pp = {grid.pp} needs parallel.strategy = \"pipeline\" or "
                          f"\"hybrid\" (\"tensor\" splits only over parallel.tp)")
    if cfg.parallel.compression != "none" and name in ("pipeline", "tensor", "hybrid"):
        raise ConfigError(f"{cfg.source}: parallel.compression = \"{cfg.parallel.compression}\" applies to "
                          f"parallel.strategy = \"data\" (pipeline, tensor and hybrid send float32)")
    if cfg.parallel.zero and name != "data":
        raise ConfigError(f"{cfg.source}: parallel.zero = 1 applies to parallel.strategy = \"data\" only")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, grid, global_batch)
