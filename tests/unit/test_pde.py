"""PDE data sets (docs/data.md): each solver's order of accuracy on a smooth exact solution, samples that
depend only on (seed, split, index), the file layout, and a tiny generation run in one process."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcopt.data import inspect, pde
from hpcopt.data.importer import read_stats
from hpcopt.errors import ConfigError, DataError


@pytest.mark.parametrize("problem", pde.PROBLEMS)
def test_observed_order_matches_the_scheme(problem):
    grids, errors, observed, expected = pde.convergence_order(problem)
    assert len(grids) == 3 and len(errors) == 3
    assert errors[0] > errors[1] > errors[2] > 0
    assert abs(observed - expected) <= 0.2, (problem, grids, errors, observed)


def test_first_order_burgers_scheme_is_first_order():
    grids = (64, 128, 256)
    errors = [pde._burgers_error(g, "rusanov") for g in grids]
    assert abs(pde._order([1 / g for g in grids], errors) - 1.0) <= 0.2, errors


def test_pcg_agrees_with_the_direct_solve():
    rng = pde.stream(5, 0)
    a = np.where(pde.grf2d(rng, 40, 2.0, 3.0, 3.0) >= 0, 12.0, 3.0)
    direct, iterative = pde.solve_darcy(a, 1.0, "cholesky"), pde.solve_darcy(a, 1.0, "pcg")
    assert np.abs(direct - iterative).max() <= 1e-10 * np.abs(direct).max()
    assert (direct[1:-1, 1:-1] > 0).all() and not direct[[0, -1], :].any() and not direct[:, [0, -1]].any()


@pytest.mark.parametrize("problem", pde.PROBLEMS)
def test_sample_depends_only_on_its_index(problem):
    grid = 16
    xb, yb = pde.generate(problem, 3, 9, grid, seed=11)
    ins, outs = pde.shapes(problem, grid)
    assert xb.shape == (6, *ins) and yb.shape == (6, *outs) and xb.dtype == yb.dtype == np.float32
    for k in (0, 4):  # alone, in a block, in another block: the same bits
        x, y = pde.sample(problem, 3 + k, grid, seed=11)
        assert x.tobytes() == xb[k].tobytes() and y.tobytes() == yb[k].tobytes()
    xs, _ = pde.generate(problem, 5, 7, grid, seed=11)
    assert xs.tobytes() == xb[2:4].tobytes()
    assert np.isfinite(yb).all() and np.abs(xb).max() > 0
    assert not np.array_equal(pde.sample(problem, 3, grid, seed=11, split="test")[0], xb[0])
    assert not np.array_equal(pde.sample(problem, 3, grid, seed=12)[0], xb[0])


def test_inputs_are_what_each_problem_promises():
    a, u = pde.sample("darcy2d", 0, 24)
    assert a.shape == (1, 24, 24) and u.shape == (24, 24)  # one input channel, as conv2d models take
    assert set(np.unique(a)) == {3.0, 12.0} and u.max() > 0
    a, _ = pde.sample("darcy2d", 0, 24, coefficient="lognormal")
    assert (a > 0).all() and len(np.unique(a)) > 100
    u0, uT = pde.sample("heat2d", 0, 24)
    for v in (u0[0], uT):
        assert not v[[0, -1], :].any() and not v[:, [0, -1]].any()
    assert np.abs(uT).max() < np.abs(u0).max()  # heat only decays
    u0, uT = pde.sample("burgers1d", 0, 64)
    assert abs(float(u0.mean())) < 1e-6 and abs(float(uT.mean())) < 1e-6  # conservative: the mean stays 0


def test_refined_solve_keeps_every_rth_node_or_averages_r_cells():
    x, y = pde.sample("darcy2d", 2, 9, seed=1, refine=2)
    xf, yf = pde.sample("darcy2d", 2, 17, seed=1, modes=8)  # the same field, the same fine solve
    assert x.tobytes() == xf[:, ::2, ::2].tobytes() and y.tobytes() == yf[::2, ::2].tobytes()
    x, y = pde.sample("burgers1d", 2, 32, seed=1, refine=4)
    xf, yf = pde.sample("burgers1d", 2, 128, seed=1, modes=15)
    np.testing.assert_allclose(x, xf.reshape(32, 4).mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, yf.reshape(32, 4).mean(axis=1), rtol=0, atol=1e-6)
    assert pde.resolve_params("heat2d", 17, {"refine": 2})["steps"] == 32
    assert pde.resolve_params("heat2d", 17, {"refine": 2})["modes"] == 15


def test_a_field_is_the_same_function_on_every_grid():
    fields = [pde.grf2d(pde.stream(0, 5), g, 2.0, 3.0, 3.0, "cos", modes=6) for g in (9, 17, 33)]
    np.testing.assert_allclose(fields[1][::2, ::2], fields[0], atol=1e-12)
    np.testing.assert_allclose(fields[2][::4, ::4], fields[0], atol=1e-12)
    fields = [pde.grf2d(pde.stream(0, 5), g, 2.5, 7.0, 1.0, "sin", modes=7) for g in (9, 17)]
    np.testing.assert_allclose(fields[1][::2, ::2], fields[0], atol=1e-12)
    fields = [pde.grf1d_periodic(pde.stream(0, 5), g, 2.0, 5.0, 25.0, modes=3) for g in (8, 24)]
    np.testing.assert_allclose(fields[1][1::3], fields[0], atol=1e-12)  # cell centres (j + 1/2) / grid


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="unknown PDE problem"):
        pde.resolve_params("wave", 16)
    with pytest.raises(ConfigError, match="unknown parameter 'nu'"):
        pde.resolve_params("darcy2d", 16, {"nu": 0.1})
    with pytest.raises(ConfigError, match="coefficient must be one of"):
        pde.resolve_params("darcy2d", 16, {"coefficient": "binary"})
    with pytest.raises(ConfigError, match="kappa must be a positive"):
        pde.resolve_params("heat2d", 16, {"kappa": -1.0})
    with pytest.raises(ConfigError, match="grid must be"):
        pde.resolve_params("heat2d", 2)
    assert pde.resolve_params("darcy2d", 64)["solver"] == "cholesky"
    assert pde.resolve_params("darcy2d", 256)["solver"] == "pcg"


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("train/x", "train/y", "test/x", "test/y", "stats/y_mean", "stats/y_std")}


def test_tiny_generation_in_one_process(tmp_path):
    out = str(tmp_path / "sub" / "darcy.h5")
    info = pde.make_pde("darcy2d", out, 21, 12, seed=4, test_fraction=0.25, comm=MPI.COMM_SELF,
                        chunk_samples=4, coefficient="lognormal")
    assert info.sizes == {"train": 16, "test": 5} and info.ranks == 1
    assert os.listdir(tmp_path / "sub") == ["darcy.h5"]  # the temporary file was renamed
    with h5py.File(out, "r") as f:
        assert f.attrs["task"] == "regression" and f.attrs["problem"] == "darcy2d"
        assert f.attrs["grid"] == 12 and f.attrs["seed"] == 4 and f.attrs["coefficient"] == "lognormal"
        assert list(f.attrs["input_shape"]) == [1, 12, 12] and list(f.attrs["target_shape"]) == [12, 12]
        assert f.attrs["features"] == 144
        for split, n in (("train", 16), ("test", 5)):
            for part, shape in (("x", (1, 12, 12)), ("y", (12, 12))):
                ds = f[f"{split}/{part}"]
                assert ds.shape == (n, *shape) and ds.dtype == np.float32
                assert ds.chunks == (4, *shape) and ds.attrs["chunk_samples"] == 4
    data = read_all(out)
    x, y = pde.generate("darcy2d", 0, 16, 12, seed=4, coefficient="lognormal")
    assert data["train/x"].tobytes() == x.tobytes() and data["train/y"].tobytes() == y.tobytes()
    x, y = pde.generate("darcy2d", 0, 5, 12, seed=4, split="test", coefficient="lognormal")
    assert data["test/x"].tobytes() == x.tobytes() and data["test/y"].tobytes() == y.tobytes()
    info = inspect(out)  # the repository's own check of data files
    assert info.task == "regression" and info.sizes == {"train": 16, "test": 5}
    assert info.x_shape == (1, 12, 12) and info.y_shape == (12, 12)
    mean, std = read_stats(out)  # what data.normalize_targets trains against
    np.testing.assert_allclose(mean, data["train/y"].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, data["train/y"].astype(np.float64).std(0), rtol=1e-5, atol=1e-12)


def test_compressed_and_serial_files_hold_the_same_data(tmp_path, monkeypatch):
    args = ("burgers1d", 30, 32)
    kw = dict(seed=2, comm=MPI.COMM_SELF, chunk_samples=8, nu=0.05)
    pde.make_pde(args[0], str(tmp_path / "plain.h5"), *args[1:], **kw)
    pde.make_pde(args[0], str(tmp_path / "gz.h5"), *args[1:], compression=4, **kw)
    from hpcopt import checkpoint

    monkeypatch.setattr(checkpoint, "parallel_hdf5", lambda: False)  # h5py without MPI: serial writes
    pde.make_pde(args[0], str(tmp_path / "serial.h5"), *args[1:], **kw)
    ref = read_all(tmp_path / "plain.h5")
    for name in ("gz.h5", "serial.h5"):
        got = read_all(tmp_path / name)
        assert all(got[k].tobytes() == ref[k].tobytes() for k in ref), name
    with h5py.File(tmp_path / "gz.h5", "r") as f:
        assert f["train/x"].compression == "gzip" and f.attrs["compression"] == "gzip-4"


def test_a_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(problem, start, stop, *a):
        if start >= 8:
            raise FloatingPointError("injected")
        return original(problem, start, stop, *a)

    original = pde._generate
    monkeypatch.setattr(pde, "_generate", broken)
    with pytest.raises(DataError, match="injected.*nothing written"):
        pde.make_pde("heat2d", str(tmp_path / "h.h5"), 20, 8, comm=MPI.COMM_SELF, chunk_samples=4)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match="test_fraction"):
        pde.make_pde("heat2d", str(tmp_path / "h.h5"), 20, 8, comm=MPI.COMM_SELF, test_fraction=1.0)
    assert os.listdir(tmp_path) == []


def test_command_line_parses_problem_parameters():
    from hpcopt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["data", "make", "heat2d", "o.h5", "--grid", "32", "--kappa", "0.02", "--T", "0.5"])
    assert pde.params_from_args("heat2d", args) == {"kappa": 0.02, "T": 0.5}
    args = parser.parse_args(["data", "make", "darcy2d", "o.h5", "--coefficient", "lognormal", "--solver", "pcg"])
    assert pde.params_from_args("darcy2d", args) == {"coefficient": "lognormal", "solver": "pcg"}
