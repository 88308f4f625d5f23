"""`hpcopt bench data` end to end at a tiny size (64 darcy2d samples at G = 16, one timed run): it
launches `mpirun -n 1` and `-n 2` itself, prints the row contract as JSON lines with positive figures,
and leaves no file behind in the directory it ran in. Nothing here asserts a time."""
import json
import math
import os

import pytest

from tests.conftest import hpcopt

pytestmark = pytest.mark.mpi
KEYS = {"name", "unit", "hpcopt", "peer_name", "peer", "ratio", "limit"}


def test_bench_data_rows_and_cleanup(tmp_path):
    p = hpcopt("bench", "data", "--json", "--samples", "64", "--grid", "16", "--repeats", "1",
               timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # data files, .npy files, temporary directory: gone
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows, p.stdout
    for r in rows:
        assert r["suite"] == "data" and KEYS <= r.keys(), r
        assert isinstance(r["hpcopt"], (int, float)) and math.isfinite(r["hpcopt"]) and r["hpcopt"] > 0, r
        if r["peer"] is not None:
            assert r["peer_name"] and r["peer"] > 0 and r["ratio"] > 0, r

    def one(unit, *words):
        found = [r for r in rows if r["unit"] == unit and all(w in r["name"] for w in words)]
        assert len(found) == 1, (unit, words, rows)
        return found[0]

    for n in ("1 rank:", "2 ranks:"):
        gen = one("samples/s", n, "generation")
        assert gen["threads_per_rank"] == 1
        write = one("MB/s", n, "write")
        assert "numpy.save" in write["peer_name"]
        assert write["ratio"] == pytest.approx(write["hpcopt"] / write["peer"])
        one("ms/sample", n, "solve")
    busy = one("fraction", "2 ranks:", "busy")  # time solving / (2 x wall): at most 1, at least something
    assert 0 < busy["hpcopt"] <= 1 and 0 < busy["peer"] <= 1 and busy["limit"] == 1.0
    eff = one("fraction", "efficiency 1 -> 2 ranks")
    assert eff["limit"] == 1.0 and eff["peer"] == 0.85
    rate = {n: one("samples/s", n, "generation")["hpcopt"] for n in ("1 rank:", "2 ranks:")}
    assert eff["hpcopt"] == pytest.approx(rate["2 ranks:"] / (2 * rate["1 rank:"]))
