"""Every `hpcopt bench` suite runs end to end at a tiny size and prints the row contract as JSON lines
(name, unit, hpcopt, peer_name, peer, ratio, limit): the benchmarks must not rot between the times
someone measures with them. Nothing here asserts a time; the suites that launch mpirun themselves
(ckpt, dp, pipeline) run their real launches."""
import json
import math
import os

import pytest

from tests.conftest import hpcopt

pytestmark = pytest.mark.mpi
KEYS = {"name", "unit", "hpcopt", "peer_name", "peer", "ratio", "limit"}
SUITES = {
    "step": ["--layers", "32,16,10", "--batch", "8", "--steps", "2", "--repeats", "1"],
    "optim": ["--params", "4096", "--repeats", "1", "--optimizers", "sgd,adam,lamb"],
    "ckpt": ["--mb", "1", "--repeats", "1"],
    "dp": ["--layers", "32,16,10", "--batch", "8", "--steps", "2", "--repeats", "1"],
    "pipeline": ["--pp", "2", "--micro-batches", "2", "--width", "16", "--rows", "4", "--steps", "1",
                 "--repeats", "1"],
    "step-cnn": ["--model", "cnn", "--batch", "2", "--steps", "1", "--repeats", "1"],
    "stream": ["--gib", "0.002", "--features", "64", "--batch", "16", "--steps", "4", "--window", "2"],
    "surrogate": ["--samples", "40", "--grid", "8", "--steps", "3", "--batch", "8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_prints_rows_with_its_peer_and_ratio(suite, tmp_path):
    name = suite.split("-")[0]   # step-cnn: the step suite with its CNN
    p = hpcopt("bench", name, "--json", "--threads", "1", *SUITES[suite], timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert os.listdir(tmp_path) in ([], ["bench-stream-0.002g.h5"], ["bench-darcy-8-40.h5"]), os.listdir(tmp_path)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows, p.stdout
    for r in rows:
        assert KEYS <= r.keys(), r
        assert isinstance(r["hpcopt"], (int, float)) and math.isfinite(r["hpcopt"]) and r["hpcopt"] >= 0, r
    compared = [r for r in rows if r["peer"] is not None]
    assert compared, f"no row of {suite} names a peer: {rows}"
    for r in compared:
        assert r["peer_name"] and r["ratio"] is not None and r["ratio"] > 0, r
