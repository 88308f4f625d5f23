"""run.reproducible = true: the digits MLP's parameters after 100 steps are bitwise equal for 1, 2, 3, 4 and
8 ranks, 1 and 2 threads per rank, overlap on and off, ZeRO-1 (3 ranks), a pipeline of 2 stages (4
micro-batches, GPipe) and of 2 stages x 2 replicas (3 micro-batches, 1F1B), with sgd, momentum and adam,
and so are the logged training losses and test metrics; a
2-rank checkpoint (data parallel or 2 stages) resumed on 3 ranks ends bitwise equal to the uninterrupted
2-rank run; local SGD is the
same bits for 1 and 2 threads and its averages are exact; what it does not cover is one line.

Each layout is one launch of `hpcopt sweep` over the three optimizers with one group of all the ranks
(three ordinary runs on the world, one process start-up)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export, hpcopt, run

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
STEPS = 100
COMMON = ("run.reproducible=true", f"run.steps={STEPS}", "data.batch_size=96", "run.eval_every=0",
          "run.log_every=50")
OPTIMIZERS = ("sgd", "momentum", "adam")

# (ranks, threads per rank, extra overrides)
PIPE = ("parallel.strategy=pipeline", "parallel.pp=2")
LAYOUTS = [(1, 1, ()), (1, 2, ()), (2, 2, ("parallel.overlap=false", "parallel.bucket_mb=0.01")),
           (3, 1, ("parallel.zero=1",)), (4, 1, ()), (8, 1, ()),
           (2, 1, (*PIPE, "parallel.micro_batches=4", "parallel.schedule=gpipe")),           # 2 stages
           (4, 1, (*PIPE, "parallel.micro_batches=3", "parallel.schedule=1f1b"))]           # 2 stages x dp 2


def sweep(tmp_path, name: str, n: int, threads: int, extra, digits) -> dict[str, dict]:
    """The three optimizers on n ranks: {optimizer: exported arrays}."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f'job = "{JOB}"\n[sweep]\nname = "{name}"\nout_dir = "{tmp_path / name}"\nmethod = "grid"\n'
                    f'ranks_per_trial = {n}\nmetric = "loss"\n[space]\n"optimizer.name" = {list(OPTIMIZERS)}\n'
                    .replace("'", '"'))
    args = ("sweep", str(path), f"data.path={digits}", f"backend.threads={threads}", *COMMON, *extra, "--quiet")
    p = hpcopt(*args, n=n if n > 1 else None, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = {}
    for t, name_ in enumerate(OPTIMIZERS):
        trial = tmp_path / name / f"trial_{t:04d}"
        out[name_] = dict(ckpt_export(trial / "checkpoints" / f"step_{STEPS:08d}.h5", tmp_path / f"{name}-{name_}.npz"))
        # the logged training loss (every row's loss summed exactly): the same bits too
        out[name_]["logged loss"] = np.array([json.loads(line)["loss"] for line in open(trial / "metrics.jsonl")
                                              if '"loss"' in line])
        assert out[name_]["logged loss"].size == STEPS // 50
        # the test metrics of the last step (each row's terms summed exactly): the same bits too
        last = [json.loads(line) for line in open(trial / "metrics.jsonl") if '"test_loss"' in line][-1]
        out[name_]["test metrics"] = np.array([last["test_loss"], last["test_acc"]])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("repro-ref")
    return sweep(tmp, "ref", 1, 1, (), digits)


def layout_id(n: int, threads: int, extra) -> str:
    return f"{n}ranks-{threads}threads" + "".join(
        "-nooverlap" if "overlap" in o else "-zero1" if "zero" in o else "-pipeline" if "pipeline" in o
        else "-" + o.split("=")[1] if "schedule" in o else "" for o in extra)


@pytest.mark.parametrize("n,threads,extra", LAYOUTS[1:], ids=[layout_id(*lay) for lay in LAYOUTS[1:]])
def test_bitwise_equal_for_any_layout(tmp_path, digits, reference, n, threads, extra):
    got = sweep(tmp_path, f"n{n}", n, threads, extra, digits)
    for opt in OPTIMIZERS:
        for k, ref in reference[opt].items():
            assert np.array_equal(got[opt][k], ref), f"{opt} {k}: max |diff| {np.abs(got[opt][k] - ref).max()}"


@pytest.mark.parametrize("first", [(), (*PIPE, "parallel.micro_batches=4")], ids=["data", "pipeline"])
def test_resumed_on_another_rank_count_continues_bitwise(tmp_path, digits, reference, first):
    """Checkpoints of a 2-rank run (data parallel, or a pipeline of 2 stages) at step 50; resumed on 3
    data-parallel ranks to step 100: equal to the 2-rank run that was not interrupted (itself equal to
    the 1-rank reference)."""
    two = tmp_path / "two"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={two}", *COMMON, "checkpoint.every_steps=50",
           *first, "--quiet", n=2, check=True, timeout=120)
    three = tmp_path / "three"
    (three / "checkpoints").mkdir(parents=True)
    for f in os.listdir(two / "checkpoints"):
        if f.startswith("step_00000050"):
            shutil.copy(two / "checkpoints" / f, three / "checkpoints" / f)
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={three}", *COMMON, "--resume",
               str(three / "checkpoints" / "step_00000050.h5"), "--quiet", n=3, timeout=120)
    assert p.returncode == 0 and "at step 50" in p.stderr, p.stdout + p.stderr
    a = ckpt_export(two / "checkpoints" / f"step_{STEPS:08d}.h5", tmp_path / "a.npz")
    b = ckpt_export(three / "checkpoints" / f"step_{STEPS:08d}.h5", tmp_path / "b.npz")
    for k in a:
        assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], reference["adam"][k]), k
    logged = [[json.loads(line)["loss"] for line in open(d / "metrics.jsonl") if '"loss"' in line] for d in (two, three)]
    assert logged[1] == logged[0][-1:] and logged[0][-1] == reference["adam"]["logged loss"][-1], logged


def test_local_sgd_is_the_same_bits_for_any_thread_count(tmp_path, digits):
    """Local SGD: each replica steps with the fixed-order kernels and the averages (parameters and adam's
    state, every 4 steps) are exact sums: 1 and 2 threads per rank give the same bits."""
    extra = ("parallel.strategy=local_sgd", "parallel.average_every=4", "parallel.average_optimizer_state=true")
    one, two = (sweep(tmp_path, f"local{t}", 2, t, extra, digits) for t in (1, 2))
    for opt in OPTIMIZERS:
        for k, ref in one[opt].items():
            assert np.array_equal(two[opt][k], ref), f"{opt} {k}: max |diff| {np.abs(two[opt][k] - ref).max()}"


AVERAGE = """
from types import SimpleNamespace
import numpy as np
from mpi4py import MPI
from hpcopt.parallel.local_sgd import Averaging
comm = MPI.COMM_WORLD
v = np.full(5, [1e8, 1.0, -1e8, 1.0][comm.Get_rank()], np.float32)
Averaging(SimpleNamespace(data=v), comm, 1, False, dict, None, exact=True).average_replicas(False)
got = comm.gather(v.tolist())
if comm.Get_rank() == 0:
    print("averages", got, flush=True)
"""


def test_local_sgd_averages_are_exact_sums():
    """1e8 + 1 - 1e8 + 1 over 4 ranks: float32 sums give 0, 1 or 2 by the order they add in (1e8 + 1 rounds
    to 1e8); the exact sum is 2 in every order, so every rank's average is 0.5."""
    p = run(["-c", AVERAGE], n=4, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"averages {[[0.5] * 5] * 4}" in p.stdout, p.stdout


@pytest.mark.parametrize("override,words", [
    ("parallel.strategy=tensor", 'does not cover parallel.strategy = "tensor"'),
    ("parallel.compression=fp16", 'does not cover parallel.compression = "fp16"'),
    ("model.dtype=float64", 'does not cover model.dtype = "float64"'),
])
def test_what_it_does_not_cover_is_one_line(tmp_path, digits, override, words):
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={tmp_path / 'r'}", "run.reproducible=true",
               override, n=2, timeout=60)
    assert p.returncode == 2 and words in p.stderr, p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("hpcopt:")]) == 1
