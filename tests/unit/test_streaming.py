"""Data larger than memory: the block shuffle is a permutation of (seed, epoch) only that keeps each
batch within a window of chunks, read-ahead hands out the very batches of a plain read, and a data
parallel split of a batch is the same rows with either shuffle."""
import h5py
import numpy as np
import pytest

from hpcopt.data import ShardedLoader
from hpcopt.data.loader import block_permutation


def test_block_permutation_is_a_permutation_of_seed_and_epoch():
    p = block_permutation(3, 1, 1000, 64, 4)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, block_permutation(3, 1, 1000, 64, 4))
    assert not np.array_equal(p, block_permutation(3, 2, 1000, 64, 4))
    assert not np.array_equal(p, block_permutation(4, 1, 1000, 64, 4))
    # each window of 4 whole chunks (256 rows) draws its rows from 4 chunks only, in shuffled order
    q = block_permutation(3, 1, 1024, 64, 4)
    for w in range(0, 1024, 256):
        assert len(np.unique(q[w:w + 256] // 64)) == 4
    assert not np.array_equal(np.sort(q[:256]), q[:256])


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stream") / "chunked.h5")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update(name="toy", classes=5)
        for split, n in (("train", 640), ("test", 64)):
            x = f.create_dataset(f"{split}/x", data=rng.standard_normal((n, 6)).astype(np.float32), chunks=(32, 6))
            x.attrs["chunk_samples"] = 32
            f[f"{split}/y"] = np.arange(n) % 5
    return path


@pytest.mark.parametrize("shuffle", ["global", "block"])
def test_read_ahead_and_dp_split_give_the_same_batches(chunked, shuffle):
    plain = ShardedLoader(chunked, "train", 64, 0, 1, seed=2, shuffle=shuffle, window=3)
    ahead = ShardedLoader(chunked, "train", 64, 0, 1, seed=2, shuffle=shuffle, window=3, read_ahead=True)
    halves = [ShardedLoader(chunked, "train", 64, r, 2, seed=2, shuffle=shuffle, window=3, read_ahead=True)
              for r in range(2)]
    for step in [0, 1, 2, 9, 10, 11, 25, 3]:   # across epochs (10 steps each), and back: a miss reads directly
        x, y = plain.batch(step)
        xa, ya = ahead.batch(step)
        assert np.array_equal(x, xa) and np.array_equal(y, ya)
        parts = [h.batch(step) for h in halves]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        if shuffle == "block":   # a batch of 64 rows comes from at most one window (3 chunks) and the next
            rows = plain.rows(step)
            assert len(np.unique(rows // 32)) <= 6
    for loader in (plain, ahead, *halves):
        loader.close()


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "gzip", "other-chunks"])
def test_block_reads_by_pread_equal_hdf5_reads(tmp_path, layout):
    """Block shuffle + read-ahead reads whole chunks with os.preadv (the GIL released while the disk
    works) where the layout allows it: the same batches, bitwise, as h5py's own reads; other layouts
    (compressed, chunks that are not the loader's) keep h5py."""
    path = str(tmp_path / f"{layout}.h5")
    rng = np.random.default_rng(1)
    kw = dict(chunked=dict(chunks=(32, 6)), contiguous={}, gzip=dict(chunks=(32, 6), compression="gzip"),
              **{"other-chunks": dict(chunks=(16, 6))})[layout]
    with h5py.File(path, "w") as f:
        f.attrs.update(name="toy", classes=5)
        for split, n in (("train", 650), ("test", 64)):
            x = f.create_dataset(f"{split}/x", data=rng.standard_normal((n, 6)).astype(np.float32), **kw)
            x.attrs["chunk_samples"] = 32
            f[f"{split}/y"] = np.arange(n) % 5
    fast = ShardedLoader(path, "train", 64, 0, 1, seed=2, shuffle="block", window=3, read_ahead=True)
    assert fast._raw == (layout in ("chunked", "contiguous"))
    slow = ShardedLoader(path, "train", 64, 0, 1, seed=2, shuffle="block", window=3)
    slow._raw = False
    for step in range(25):   # two epochs: the last, partial chunk (650 = 20 * 32 + 10) included
        a, b = fast.batch(step), slow.batch(step)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    fast.close()
    slow.close()
