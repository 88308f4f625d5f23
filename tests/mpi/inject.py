"""Run `hpcopt train` with a fault injected, for the failure tests.

    python inject.py MODE STEP STAMP_FILE train JOB ...   (under mpirun)

MODE raise-rank1: rank 1 raises an exception before step STEP.
MODE kill:        rank 0 SIGKILLs itself before step STEP (a node dying: no checkpoint, no clean-up).
MODE kill-in-write: rank 0 SIGKILLs itself in the middle of writing the checkpoint of step STEP.
MODE no-mpio:     h5py is treated as built without MPI (the serial fallback); STEP is unused.
MODE sleep-in-write: rank 2 sleeps 300 s at the start of writing the checkpoint of step STEP (a stall
                  inside checkpoint writing, for the watchdog).
MODE count-rank1: rank 1's first checkpoint agreement at or after step STEP is an Allreduce of 5 ints,
                  not 4 (a collective mismatch).
MODE skip-rank1:  rank 1 skips the Allreduce of its first checkpoint agreement at or after step STEP (a
                  missing collective).
MODE segv-rank1:  rank 1 dies of SIGSEGV (reads address 0) before step STEP.
The time of the fault is written to STAMP_FILE.
"""
import ctypes
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

from hpcopt import checkpoint, cli
from hpcopt.train import Trainer

mode, at_step, stamp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
del sys.argv[1:4]
rank = MPI.COMM_WORLD.Get_rank()


def mark():
    with open(stamp, "w") as f:
        f.write(repr(time.time()))


original_step = Trainer.step


def faulty_step(self):
    if self.step_count == at_step:
        if mode == "raise-rank1" and rank == 1:
            mark()
            raise RuntimeError("injected failure on rank 1")
        if mode == "kill" and rank == 0:
            mark()
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "segv-rank1" and rank == 1:
            mark()
            ctypes.string_at(0)
    return original_step(self)


original_agree = Trainer._agree
injected = []


def faulty_agree(self, flags):
    if self.step_count >= at_step and rank == 1 and not injected:
        injected.append(True)
        mark()
        if mode == "skip-rank1":
            return
        flags = np.zeros(len(flags) + 1, dtype=np.int32)  # the real one has one value less
        self.grid.world.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
        return
    return original_agree(self, flags)


original_write = checkpoint.write_parallel


def slow_write(path, comm, pieces, attrs):
    if attrs["step"] == at_step and rank == 2:
        mark()
        time.sleep(300)
    return original_write(path, comm, pieces, attrs)


original_fill = checkpoint._fill


def faulty_fill(f, pieces, checksums, attrs):
    """Write half the datasets, flush them to the file, then die."""
    if attrs["step"] != at_step:
        return original_fill(f, pieces, checksums, attrs)
    half = len(pieces) // 2
    for k, v in attrs.items():
        f.attrs[k] = v
    for i, (p, c) in enumerate(zip(pieces, checksums)):
        ds = f.create_dataset(p.name, shape=p.shape, dtype=p.data.dtype, fill_time="never")
        if p.data.size:
            ds[p.index] = p.data
        if i == half:
            f.flush()
            if rank == 0:
                mark()
                os.kill(os.getpid(), signal.SIGKILL)


Trainer.step = faulty_step
if mode in ("count-rank1", "skip-rank1"):
    Trainer._agree = faulty_agree
if mode == "sleep-in-write":
    checkpoint.write_parallel = slow_write
if mode == "kill-in-write":
    checkpoint._fill = faulty_fill
if mode == "no-mpio":
    checkpoint.parallel_hdf5 = lambda: False
sys.exit(cli.main(sys.argv[1:]))
