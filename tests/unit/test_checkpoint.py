"""Checkpoint files in one process: round trip, layout-independent checksums, corruption, export."""
import numpy as np
import pytest
from mpi4py import MPI

from hpcopt import checkpoint
from hpcopt.errors import DataError


def pieces_for(arrays, rank, nranks):
    out = []
    for name, a in arrays.items():
        lo, hi = checkpoint.rows_of(a.shape[0], rank, nranks)
        out.append(checkpoint.Piece(name, a.shape, a[lo:hi], lo))
    return out


ARRAYS = {
    "params/dense0/weight": np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32),
    "params/dense0/bias": np.arange(5, dtype=np.float32),
    "optim/m/dense0/weight": np.ones((7, 5), np.float32),
    "optim/m/dense0/bias": np.zeros(5, np.float32),
}
ATTRS = dict(step=3, epoch=0, config="[run]\n", world=np.array([1, 1, 1]))


def test_round_trip_and_export(tmp_path):
    path = str(tmp_path / "step_00000003.h5")
    checkpoint.write_parallel(path, MPI.COMM_SELF, pieces_for(ARRAYS, 0, 1), ATTRS)
    ck = checkpoint.read(path)
    np.testing.assert_array_equal(ck.params["dense0.weight"], ARRAYS["params/dense0/weight"])
    np.testing.assert_array_equal(ck.optim["m"]["dense0.weight"], 1)
    assert ck.attrs["step"] == 3 and ck.attrs["format_version"] == checkpoint.FORMAT_VERSION
    keys = checkpoint.export_npz(path, str(tmp_path / "p.npz"))
    assert keys == ["dense0.bias", "dense0.weight"]
    assert not list(tmp_path.glob("*.tmp"))


def test_checksum_of_slices_adds_up_to_checksum_of_whole():
    a = np.random.default_rng(1).standard_normal((1000, 37)).astype(np.float32)
    whole = checkpoint.checksum(a)
    for nranks in (2, 3, 7):
        total = np.zeros(2, np.uint64)
        for r in range(nranks):
            lo, hi = checkpoint.rows_of(len(a), r, nranks)
            total += checkpoint.checksum(a[lo:hi], lo * a.shape[1])
        np.testing.assert_array_equal(total % np.uint64(2**31 - 1), whole)
    b = a.copy()
    b.view(np.uint32)[5, 3] ^= 1  # one flipped bit
    assert not np.array_equal(checkpoint.checksum(b), whole)
    c = a.copy()
    c[[0, 1]] = c[[1, 0]]  # two rows swapped: same sum, other positions
    assert not np.array_equal(checkpoint.checksum(c), whole)


def test_float64_and_int_arrays_are_checksummed(tmp_path):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = str(tmp_path / "x.h5")
    checkpoint.write_parallel(path, MPI.COMM_SELF, [checkpoint.Piece("params/l/w", a.shape, a)], ATTRS)
    np.testing.assert_array_equal(checkpoint.read(path).params["l.w"], a)


def test_list_and_prune_ignore_tmp_files(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for s in (10, 20, 30):
        checkpoint.write_parallel(str(d / checkpoint.file_name(s)), MPI.COMM_SELF, pieces_for(ARRAYS, 0, 1), ATTRS)
    (d / "step_00000040.h5.tmp").write_bytes(b"partial")
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10, 20, 30]
    checkpoint.prune(str(tmp_path), keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [20, 30]


def test_unreadable_files_raise_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such checkpoint"):
        checkpoint.read(str(tmp_path / "none.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="not a readable HDF5 file") as e:
        checkpoint.read(str(junk))
    assert "\n" not in str(e.value)
