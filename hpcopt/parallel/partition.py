"""The model partition of one rank: which layers it holds (a pipeline stage, or all of them), how each
is split over tp (tensor.py), and where every tensor it holds sits in the GLOBAL model, for the
update's norm (tensors every tp rank holds alike are counted once) and for checkpoints (one layout
function, checkpoint.piece / checkpoint.restore_block).

    replicas: the dp ranks of this partition hold the same tensors; so do the tp ranks for a FULL
    layer or a ROW layer's bias. A checkpoint block held by R ranks is written by all R, a share of
    its rows each: every byte of the global arrays is written once.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import checkpoint, modelspec
from ..comm import Grid
from ..config import JobConfig
from ..nn.stage import Stage
from .tensor import layer_splits


def global_specs(widths: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(key, global shape) of every tensor of the MLP `widths`, in the unsplit model's buffer order."""
    return modelspec.tensors(modelspec.from_widths(widths))


class Partition:
    """Units [lo, hi) of the model on this rank, split over tp_comm, replicated over dp_comm.
    sync_batch_stats: batch norm sums its statistics over dp_comm (the replicas step together)."""

    def __init__(self, cfg: JobConfig, grid: Grid, lo: int, hi: int, bounds: list[tuple[int, int]] | None = None,
                 sync_batch_stats: bool = True):
        m = cfg.model
        self.grid = grid
        self.spec = modelspec.from_config(m, cfg.source)
        self.bounds = bounds or [(lo, hi)]   # every stage's [lo, hi) (one stage unless a pipeline)
        self.splits = layer_splits(len(self.spec.units), grid.tp)
        self.stage = Stage(self.spec, lo, hi, m.activation, m.loss, m.dtype, cfg.run.seed, m.init,
                           self.splits, grid.tp, grid.tp_rank)
        self.flat = self.stage.flat
        self.global_specs = modelspec.tensors(self.spec)
        self.global_buffers = modelspec.buffers(self.spec)
        self.reports_loss = self.stage.is_last and grid.tp_rank == 0  # one rank per dp replica
        self.dp_sum = self._dp_sum if sync_batch_stats and grid.dp > 1 else None
        self.target_scale: tuple[np.ndarray, np.ndarray] | None = None   # (mean, std): data.normalize_targets

    def denormalize(self, out: np.ndarray) -> np.ndarray:
        """The network's output in the targets' original units (it trains on (y - mean) / std)."""
        if self.target_scale is None:
            return out
        mean, std = self.target_scale
        return (out.reshape(len(out), -1) * std.reshape(-1) + mean.reshape(-1)).astype(out.dtype).reshape(out.shape)

    def _dp_sum(self, a: np.ndarray) -> None:
        self.grid.dp_comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    def tp_sum(self, a: np.ndarray) -> None:
        """a := the sum of a over the tp ranks (in place); nothing when tp = 1."""
        if self.grid.tp > 1:
            self.grid.tp_comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    def norm_comms(self) -> tuple[MPI.Comm, ...]:
        """Where the squared gradient norm of this partition is summed into the model's."""
        return (self.grid.tp_comm, self.grid.pp_comm)

    def not_counted(self) -> list[tuple[int, int]]:
        """(offset, length) of the tensors this rank holds but tp rank 0 counts in the norm."""
        if self.grid.tp == 1 or self.grid.tp_rank == 0:
            return []
        f = self.flat
        return [(f.offsets[k], f.spec(k).size) for k in f.keys()
                if self.stage.layer(k).replicated_over_tp(k.split(".")[1])]

    def blocks(self, replicas: int | None = None, replica: int | None = None,
               writer: bool = True) -> dict[str, checkpoint.Block]:
        """key -> where the tensor sits in the global model and in this rank's flat buffer, with the
        ranks that hold the same block (dp replicas, and tp ranks for replicated tensors).
        replicas/replica/writer: override the dp part (a parameter server: the server alone writes)."""
        g, f = self.grid, self.flat
        dp, dp_rank = (g.dp, g.dp_rank) if replicas is None else (replicas, replica)
        out = {}
        for k in f.keys():
            layer, which = self.stage.layer(k), k.split(".")[1]
            r, i = (dp * g.tp, dp_rank * g.tp + g.tp_rank) if layer.replicated_over_tp(which) else (dp, dp_rank)
            off = f.offsets[k]
            out[k] = checkpoint.Block(k, layer.block(which), off, off + f.spec(k).size, r, i, writer)
        return out

    def buffer_blocks(self, replicas: int | None = None, replica: int | None = None,
                      writer: bool = True) -> dict[str, checkpoint.Block]:
        """key -> the block of a buffer (batch norm's running statistics, whole on every rank that holds
        its layer) in stage.buffers; the same overrides as blocks()."""
        g, b = self.grid, self.stage.buffers
        dp, dp_rank = (g.dp, g.dp_rank) if replicas is None else (replicas, replica)
        return {k: checkpoint.Block(k, (slice(0, b.spec(k).shape[0]),), b.offsets[k], b.offsets[k] + b.spec(k).size,
                                    dp * g.tp, dp_rank * g.tp + g.tp_rank, writer) for k in b.keys()}

    def global_shape(self, key: str) -> tuple[int, ...]:
        layer = self.stage.layer(key)
        return layer.global_shape(key.split(".")[1])
