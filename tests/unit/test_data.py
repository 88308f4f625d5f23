"""Data files and the deterministic sharded loader (DESIGN §6)."""
import h5py
import numpy as np

from hpcopt.data import ShardedLoader, inspect, make_synthetic
from hpcopt.data.loader import epoch_permutation


def test_digits_file(digits):
    info = inspect(digits)
    assert (info.features, info.classes) == (64, 10)
    assert info.sizes == {"train": 1438, "test": 359}
    with h5py.File(digits) as f:
        x = f["train/x"][()]
        assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_permutation_depends_only_on_seed_and_epoch():
    a = epoch_permutation(3, 7, 100)
    np.testing.assert_array_equal(a, epoch_permutation(3, 7, 100))
    assert not np.array_equal(a, epoch_permutation(3, 8, 100))
    assert not np.array_equal(a, epoch_permutation(4, 7, 100))
    assert sorted(a) == list(range(100))


def test_global_batch_is_the_same_whatever_the_dp_size(digits):
    """The union of the dp slices of step s, in rank order, is exactly the 1-rank batch of step s."""
    one = ShardedLoader(digits, "train", 48, 0, 1, seed=1)
    for dp in (2, 3, 4):
        shards = [ShardedLoader(digits, "train", 48, r, dp, seed=1) for r in range(dp)]
        for step in (0, 5, one.steps_per_epoch + 2):  # also across an epoch boundary
            x1, y1 = one.batch(step)
            parts = [s.batch(step) for s in shards]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x1)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y1)


def test_synthetic_any_size_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    make_synthetic(a, 5000, 12, 3, seed=4)
    make_synthetic(b, 5000, 12, 3, seed=4)
    info = inspect(a)
    assert info.sizes == {"train": 5000, "test": 1000} and info.features == 12 and info.classes == 3
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["train/x"][()], fb["train/x"][()])
        assert set(np.unique(fa["train/y"][()])) == {0, 1, 2}
