"""Data parallel at scale under mpirun (issue 5): buckets and overlap, compression, ZeRO-1, local SGD and
async SGD each do what they promise, never hang, and checkpoint in the global format."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcopt import checkpoint
from tests.conftest import REPO, ckpt_verify, hpcopt, run, run_env

pytestmark = pytest.mark.mpi
JOB = os.path.join(REPO, "jobs/digits_mlp.toml")

# the strategies of issue 5 as overrides of the main job
STRATEGIES = {
    "buckets": ["parallel.bucket_mb=0.001", "parallel.overlap=true"],
    "fp16": ["parallel.compression=fp16", "parallel.bucket_mb=0.05"],
    "bf16": ["parallel.compression=bf16"],
    "topk": ["parallel.compression=topk", "parallel.topk_density=0.01"],
    "zero": ["parallel.zero=1", "parallel.bucket_mb=0.05"],
    "local_sgd": ["parallel.strategy=local_sgd", "parallel.average_every=4"],
    "async": ["parallel.strategy=async", "parallel.max_staleness=1"],
}


def train(digits, out, n, *extra, steps=None, timeout=180, check=True):
    args = [JOB, f"data.path={digits}", f"run.out_dir={out}", "--quiet", *extra]
    if steps:
        args.append(f"run.steps={steps}")
    return hpcopt("train", *args, n=n, timeout=timeout, check=check)


def final_params(out, step):
    ck = checkpoint.read(str(out / "checkpoints" / checkpoint.file_name(step)))
    return ck


def records(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


# -- equivalence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_buckets_and_overlap_equal_one_allreduce(tmp_path, digits, n):
    one = tmp_path / "one"
    many = tmp_path / "many"
    train(digits, one, n, "parallel.bucket_mb=1000", "parallel.overlap=false", steps=50)
    train(digits, many, n, "parallel.bucket_mb=0.001", "parallel.overlap=true", steps=50)  # 3 buckets
    a, b = final_params(one, 50), final_params(many, 50)
    for k in a.params:
        if n == 2:  # a + b == b + a: the same sum whatever the algorithm, so bitwise
            assert np.array_equal(a.params[k], b.params[k]), k
        else:  # 4 ranks: Iallreduce per bucket may add in another order than one Allreduce
            np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("n", [2, 4])
def test_zero1_equals_zero0_after_100_adam_steps(tmp_path, digits, n):
    ref, got = tmp_path / "z0", tmp_path / "z1"
    common = ["optimizer.name=adam", "optimizer.lr=0.001", "parallel.bucket_mb=0.01"]
    train(digits, ref, n, *common, "parallel.zero=0", steps=100)
    train(digits, got, n, *common, "parallel.zero=1", steps=100)
    a, b = final_params(ref, 100), final_params(got, 100)
    # reduce-scatter may add the 4 ranks' gradients in another order than Allreduce: rounding only
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert a.optim.keys() == b.optim.keys() == {"exp_avg", "exp_avg_sq"}
    for s in a.optim:
        for k in a.optim[s]:
            # moments of gradients summed in another order: entries near 0 differ by ~1e-6 of the largest
            np.testing.assert_allclose(b.optim[s][k], a.optim[s][k], rtol=1e-5,
                                       atol=1e-6 * np.abs(a.optim[s][k]).max(), err_msg=(s, k))


SIZES_SCRIPT = """
import sys
from mpi4py import MPI
from hpcopt import comm, config, parallel
cfg = config.load(sys.argv[1], sys.argv[2:])
grid = comm.make_grid(MPI.COMM_WORLD, cfg.parallel.dp, 1, 1, cfg.source)
s = parallel.build(cfg, grid, 64)
sizes = MPI.COMM_WORLD.gather({k: a.size for k, a in s.update.state.items()})
if grid.rank == 0:
    print("SIZES", repr(sizes), s.flat.size, max(sp.size // sp.shape[0] for sp in s.flat.specs))
"""


def test_zero1_state_is_a_quarter_per_rank_on_4_ranks(tmp_path):
    script = tmp_path / "sizes.py"
    script.write_text(SIZES_SCRIPT)
    p = run([str(script), JOB, "model.layers=[64, 512, 512, 10]", "optimizer.name=adam", "parallel.zero=1"],
            n=4, timeout=120, check=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("SIZES")][0]
    sizes, n, longest_row = eval(line.split(" ", 1)[1].rsplit(" ", 2)[0]), *map(int, line.split()[-2:])
    assert len(sizes) == 4
    for state in ("exp_avg", "exp_avg_sq"):
        per_rank = [s[state] for s in sizes]
        assert sum(per_rank) == n  # the shards tile the buffer
        for size in per_rank:  # 1/4 each, give or take the row a boundary snaps to
            assert abs(size - n / 4) <= longest_row, (state, per_rank, n)


def test_local_sgd_every_step_equals_synchronous_sgd(tmp_path, digits):
    sync, local = tmp_path / "sync", tmp_path / "local"
    sgd = ["optimizer.name=sgd", "optimizer.lr=0.1"]
    train(digits, sync, 2, *sgd, steps=50)
    train(digits, local, 2, *sgd, "parallel.strategy=local_sgd", "parallel.average_every=1", steps=50)
    a, b = final_params(sync, 50), final_params(local, 50)
    # mean_r(p - lr g_r) vs p - lr mean_r(g_r): the same update, rounded in another order each step
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-5, atol=1e-6, err_msg=k)


# -- learning -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,n,target", [("fp16", 2, 0.95), ("topk", 2, 0.93), ("async", 4, 0.93)])
def test_trains_digits(tmp_path, digits, name, n, target):
    out = tmp_path / name
    extra = {"fp16": ["parallel.compression=fp16"], "topk": ["parallel.compression=topk",
             "parallel.topk_density=0.01"], "async": ["parallel.strategy=async"]}[name]
    train(digits, out, n, *extra, timeout=300)
    recs = records(out)
    final = recs[-1]
    print(f"{name} on {n} ranks: test accuracy {final['test_acc']:.4f}")
    assert final["test_acc"] >= target, final
    if name == "async":
        assert all("staleness_mean" in r and "staleness_max" in r for r in recs)
        bound = (4 + 2) * n - 2  # parallel.max_staleness = 4 (default): see async_ps.py
        assert 0 < max(r["staleness_max"] for r in recs) <= bound
        assert final["server_updates"] == final["step"] * n
    else:
        dense = 2 * (n - 1) / n * 4 * 26122  # fp32 ring Allreduce of the 26,122 parameters
        assert 0 < final["bytes_sent"] < (0.55 if name == "fp16" else 0.05) * dense, final


# -- no hangs, checkpoints in the global format ------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_one_worker_raising_ends_the_job(tmp_path, digits, name):
    stamp = tmp_path / "raised_at"
    p = run([os.path.join(REPO, "tests/mpi/inject.py"), "raise-rank1", "5", str(stamp), "train", JOB,
             f"data.path={digits}", f"run.out_dir={tmp_path / 'r'}", "--quiet", "run.steps=100000",
             *STRATEGIES[name]], n=4, timeout=90)
    assert p.returncode != 0
    assert "injected failure on rank 1" in p.stderr
    assert time.time() - float(stamp.read_text()) < 30, "the job did not end soon after the failure"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_finishes_budget_and_resumes_on_another_rank_count(tmp_path, digits, name):
    out = tmp_path / "four"
    extra = [*STRATEGIES[name], "checkpoint.every_steps=20", "checkpoint.keep=5", "run.log_every=5"]
    train(digits, out, 4, *extra, steps=40, timeout=120)
    assert records(out)[-1]["step"] == 40
    ck = final_params(out, 40)
    assert tuple(ck.attrs["world"]) == (4, 1, 1)
    for k, a in ck.params.items():  # global shapes, whatever wrote them
        i = int(k[len("dense"):].split(".")[0])
        widths = [64, 128, 128, 10]
        assert a.shape == ((widths[i], widths[i + 1]) if k.endswith("weight") else (widths[i + 1],))
    assert set(ck.optim) == {"exp_avg", "exp_avg_sq"}
    ckpt_verify(out / "checkpoints/step_00000040.h5")
    two = tmp_path / "two"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints/step_00000020.h5", two / "checkpoints")
    p = train(digits, two, 2, *extra, "--resume", "auto", steps=40, timeout=120)
    assert "at step 20" in p.stderr
    assert records(two)[-1]["step"] == 40


def test_zero1_checkpoint_from_2_ranks_resumes_on_1_and_4(tmp_path, digits):
    extra = ["parallel.zero=1", "optimizer.name=adam", "optimizer.lr=0.001", "checkpoint.every_steps=30",
             "checkpoint.keep=5"]
    straight = tmp_path / "straight"
    train(digits, straight, 2, *extra, steps=60)
    ref = final_params(straight, 60)
    for n in (1, 4):
        out = tmp_path / f"on{n}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(straight / "checkpoints/step_00000030.h5", out / "checkpoints")
        train(digits, out, n, *extra, "--resume", "auto", steps=60)
        got = final_params(out, 60)
        assert tuple(got.attrs["world"]) == (n, 1, 1)
        for k in ref.params:  # the same steps, the gradient summed in another order: rounding only
            np.testing.assert_allclose(got.params[k], ref.params[k], rtol=1e-6, atol=1e-7, err_msg=(n, k))
        for s in ref.optim:
            for k in ref.optim[s]:
                np.testing.assert_allclose(got.optim[s][k], ref.optim[s][k], rtol=1e-5,
                                           atol=1e-6 * np.abs(ref.optim[s][k]).max(), err_msg=(n, s, k))


@pytest.mark.parametrize("extra,message", [
    (["optimizer.name=lars", "parallel.zero=1"], "needs whole-layer norms"),
    (["optimizer.name=lamb", "parallel.zero=1"], "needs whole-layer norms"),
    (["parallel.strategy=async", "optimizer.on_nonfinite=stop"], "on_nonfinite"),
    (["parallel.strategy=pipeline", "parallel.compression=fp16"], "parallel.compression = \"fp16\" applies to"),
])
def test_unsupported_combinations_are_one_line_config_errors(tmp_path, digits, extra, message):
    p = train(digits, tmp_path / "r", None, *extra, steps=5, check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr


# -- threads per rank -----------------------------------------------------------------------------------
THREADS_SCRIPT = """
import sys
from hpcopt import cli, comm  # no numpy yet: BLAS reads its thread count when numpy loads

def report(self):
    import numba, threadpoolctl
    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    print(f"THREADS rank {self.grid.rank} blas {blas} numba {numba.get_num_threads()};", flush=True)
    from hpcopt.train import Summary
    return Summary(0, 0.0, 0.0, 0.0, 0.0, self.out_dir, None)

pin_threads = comm.pin_threads

def pin_then_patch(n):
    pin_threads(n)
    from hpcopt import train  # numpy loads here, after the pinning, as in `hpcopt train`
    train.Trainer.fit = report

comm.pin_threads = pin_then_patch
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("n,threads", [(1, 0), (2, 0), (2, 2)])
def test_blas_and_numba_follow_backend_threads(tmp_path, digits, n, threads):
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    env = {k: v for k, v in run_env().items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(script), "train", JOB, f"data.path={digits}", f"run.out_dir={tmp_path / 'r'}",
            f"backend.threads={threads}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    expected = threads or max(1, len(os.sched_getaffinity(0)) // n)
    seen = re.findall(r"THREADS rank (\d+) blas \[(\d+)\] numba (\d+);", p.stdout)
    assert sorted(int(r) for r, _, _ in seen) == list(range(n)), p.stdout
    for rank, blas, numba_threads in seen:
        assert (int(blas), int(numba_threads)) == (expected, expected), (rank, p.stdout)
