"""Run `hpcopt train` with a fault injected, for the failure tests.

    python inject.py MODE STEP STAMP_FILE train JOB ...   (under mpirun)

MODE raise-rank1: rank 1 raises an exception before step STEP.
MODE kill:        rank 0 SIGKILLs itself before step STEP (a node dying: no checkpoint, no clean-up).
MODE kill-in-write: rank 0 SIGKILLs itself in the middle of writing the checkpoint of step STEP.
MODE no-mpio:     h5py is treated as built without MPI (the serial fallback); STEP is unused.
The time of the fault is written to STAMP_FILE.
"""
import os
import signal
import sys
import time

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
    return original_step(self)


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
if mode == "kill-in-write":
    checkpoint._fill = faulty_fill
if mode == "no-mpio":
    checkpoint.parallel_hdf5 = lambda: False
sys.exit(cli.main(sys.argv[1:]))
