"""PDE data sets under a real launcher: 1, 2 and 4 ranks write the same data, bit for bit, into one
file through the mpio driver (docs/data.md), and a failure on one rank leaves nothing behind."""
import os
import re

import h5py
import numpy as np
import pytest

from tests.conftest import run

pytestmark = pytest.mark.mpi

# Chunks of 4 samples: 26 train samples make 7 chunks (the last one short), 6 test samples 2 chunks,
# so 2 and 4 ranks own unequal numbers of chunks and some ranks have nothing to write in a round.
# The ranks take 4-sample pieces from a shared counter: which rank makes which differs from run to run.
# Uncompressed files are written piece by piece; compressed ones in collective rounds of buffer_mb per
# rank: one round for darcy_lognormal_gz.h5, two chunks a round for burgers_gz.h5 (rounds spanning
# both splits, ranks with nothing to write in a round).
RUNNER = """
import sys
from hpcopt.data.pde import make_pde
d = sys.argv[1]
common = dict(samples=32, seed=7, test_fraction=0.2, chunk_samples=4)
make_pde("darcy2d", d + "/darcy.h5", grid=12, **common)
make_pde("darcy2d", d + "/darcy_lognormal_gz.h5", grid=12, coefficient="lognormal", solver="pcg",
         compression=4, **common)
make_pde("heat2d", d + "/heat.h5", grid=10, steps=6, **common)
make_pde("burgers1d", d + "/burgers_gz.h5", grid=32, nu=0.02, T=0.3, compression=1, buffer_mb=0.002, **common)
print("done")
"""
FILES = ("darcy.h5", "darcy_lognormal_gz.h5", "heat.h5", "burgers_gz.h5")
UNCOMPRESSED = ("darcy.h5", "heat.h5")


def plain(attrs):
    return {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}


def contents(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("train/x", "train/y", "test/x", "test/y", "stats/y_mean", "stats/y_std")}
        attrs = plain(f.attrs)
        dattrs = {k: plain(f[k].attrs) for k in data}
        dattrs["stats"] = plain(f["stats"].attrs)
        layout = {k: (f[k].chunks, f[k].compression) for k in data}
    return data, attrs, dattrs, layout


def test_one_two_and_four_ranks_write_the_same_bits(tmp_path):
    dirs = {}
    for n in (1, 2, 4):
        d = tmp_path / f"n{n}"
        d.mkdir()
        p = run(["-c", RUNNER, str(d)], n=n, timeout=90)
        assert p.returncode == 0 and "done" in p.stdout, p.stderr
        assert sorted(os.listdir(d)) == sorted(FILES)  # no temporary file left
        dirs[n] = d
    for name in FILES:
        ref_data, ref_attrs, ref_dattrs, ref_layout = contents(dirs[1] / name)
        assert ref_data["train/x"].shape[0] == 26 and ref_data["test/x"].shape[0] == 6
        assert np.isfinite(ref_data["train/y"]).all() and np.abs(ref_data["train/y"]).max() > 0
        for n in (2, 4):
            data, attrs, dattrs, layout = contents(dirs[n] / name)
            for k in ref_data:
                assert data[k].dtype == ref_data[k].dtype and data[k].shape == ref_data[k].shape
                assert data[k].tobytes() == ref_data[k].tobytes(), f"{name} {k}: {n} ranks differ from 1"
            assert attrs == ref_attrs and dattrs == ref_dattrs and layout == ref_layout, name
    for name in UNCOMPRESSED:  # the chunks' places are fixed at creation: the whole file is the same
        ref = (dirs[1] / name).read_bytes()
        assert all((dirs[n] / name).read_bytes() == ref for n in (2, 4)), f"{name}: file bytes differ"


FAILING = """
import sys
from mpi4py import MPI
from hpcopt.data import pde
from hpcopt.errors import DataError
original = pde._generate
def broken(problem, start, stop, grid, seed, split, p):
    if split == "test" and start == 0:  # whichever rank takes the test split's first piece
        raise FloatingPointError(f"injected on rank {MPI.COMM_WORLD.Get_rank()}")
    return original(problem, start, stop, grid, seed, split, p)
pde._generate = broken
try:
    pde.make_pde("darcy2d", sys.argv[1] + "/d.h5", 40, 10, chunk_samples=4)
except DataError as e:
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: {e}")
    sys.exit(3)
"""


def test_a_failure_on_one_rank_fails_all_and_leaves_nothing(tmp_path):
    p = run(["-c", FAILING, str(tmp_path)], n=2, timeout=60)
    assert p.returncode != 0
    # each rank prints one line (the two ranks' output may interleave): all name the same culprit
    said = re.findall(r"rank (\d): .*?generation failed on rank (\d): FloatingPointError: injected on rank (\d)",
                      p.stdout)
    assert sorted(r for r, _, _ in said) == ["0", "1"], p.stdout + p.stderr
    assert len({(a, b) for _, a, b in said}) == 1 and said[0][1] == said[0][2], p.stdout
    assert os.listdir(tmp_path) == []
