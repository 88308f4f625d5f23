"""Every CUDA kernel (hpcopt.kernels.optim_cuda) against its CPU twin, under numba's CUDA simulator.

The simulator must be switched on before numba is imported, so the comparisons run in a subprocess with
NUMBA_ENABLE_CUDASIM=1; it prints one JSON line per kernel case. Small n: the simulator runs each CUDA
thread as a Python thread. Two steps each (t = 1, 2), from fresh state, so first-step branches and the
state read-back are both covered.

Tolerance: rtol 1e-6, atol 1e-7. The element math is the same Python function on both sides, but the
simulator evaluates it with NumPy scalars (math.sqrt returns a float64 there, so a few intermediates are
more precise than the CPU kernel's float32) and the CPU kernels may contract to FMA: an ulp or two
(~1e-7 relative) per step. atol 1e-7 covers state values that are nearly zero after one step.
The float64 reductions differ only in summation order (~1e-15 relative).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, math
import numpy as np
from numba import cuda
from hpcopt.kernels import optim_cpu as C, optim_cuda as G
from hpcopt.optim.base import make_pieces

n = 1000
rng = np.random.default_rng(0)
params0 = rng.standard_normal(n, dtype=np.float32)
grads0 = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
segments = [(600, 300), (0, 600), (900, 100)]
pieces = make_pieces(segments, 400)            # 4 pieces: one layer spans two
n_pieces, n_seg = pieces[0].size, pieces[3].size - 1


def case(label, n_state, call, state_init=0.0, extra=()):
    """call(K, params, grads, state_list, scratch, t) on CPU (host arrays) and CUDA (device arrays)."""
    out = {}
    for name, K in (("cpu", C), ("cuda", G)):
        host = [params0.copy()] + [np.full(n, state_init, np.float32) for _ in range(n_state)]
        host_scratch = [np.zeros((n_pieces, 2)), np.zeros(n_seg)]
        if name == "cuda":
            arrs = [cuda.to_device(a) for a in host]
            scratch = [cuda.to_device(a) for a in host_scratch]
            pcs = tuple(cuda.to_device(a) for a in pieces)
        else:
            arrs, scratch, pcs = host, host_scratch, pieces
        for t, g in enumerate(grads0, start=1):
            gd = cuda.to_device(g) if name == "cuda" else g.copy()
            call(K, arrs[0], gd, arrs[1:], scratch, pcs, t)
        out[name] = [a.copy_to_host() if name == "cuda" else a for a in arrs]
    ok, worst = True, 0.0
    for a, b in zip(out["cuda"], out["cpu"]):
        ok = ok and bool(np.allclose(a, b, rtol=1e-6, atol=1e-7))
        worst = max(worst, float(np.max(np.abs(a - b) / (1e-7 + 1e-6 * np.abs(b)))))
    print(json.dumps({"case": label, "ok": ok, "worst_fraction_of_tolerance": worst}), flush=True)


ph = lambda K: None  # noqa
P1 = lambda K: (cuda.to_device(np.zeros(1, np.float32)) if K is G else np.zeros(1, np.float32))

case("sgd", 0, lambda K, p, g, s, sc, pc, t: K.sgd_step(p, g, P1(K), 0.1, 0.0, 0.0, 0.0, False, t == 1))
case("sgd-momentum-wd", 1, lambda K, p, g, s, sc, pc, t: K.sgd_step(p, g, s[0], 0.1, 1e-2, 0.9, 0.1, False, t == 1))
case("sgd-nesterov", 1, lambda K, p, g, s, sc, pc, t: K.sgd_step(p, g, s[0], 0.1, 0.0, 0.9, 0.0, True, t == 1))
case("adagrad", 1, lambda K, p, g, s, sc, pc, t: K.adagrad_step(p, g, s[0], 0.05, 1e-2, 1e-10, 1e-2, t),
     state_init=0.1)
case("rmsprop", 1, lambda K, p, g, s, sc, pc, t: K.rmsprop_step(p, g, s[0], P1(K), P1(K), 1e-2, 0.99, 1e-8, 0.0,
                                                                 0.0, False))
case("rmsprop-centered-momentum-wd", 3, lambda K, p, g, s, sc, pc, t: K.rmsprop_step(
    p, g, s[0], s[1], s[2], 1e-2, 0.9, 1e-6, 1e-2, 0.9, True))
case("adadelta", 2, lambda K, p, g, s, sc, pc, t: K.adadelta_step(p, g, s[0], s[1], 1.0, 0.9, 1e-6, 1e-2))
case("adam", 2, lambda K, p, g, s, sc, pc, t: K.adam_step(p, g, s[0], s[1], P1(K), 1e-3, 0.9, 0.999, 1e-8, 1e-2,
                                                          False, False, t))
case("adamw-amsgrad", 3, lambda K, p, g, s, sc, pc, t: K.adam_step(p, g, s[0], s[1], s[2], 1e-3, 0.9, 0.999, 1e-8,
                                                                   1e-1, True, True, t))
case("adamax", 2, lambda K, p, g, s, sc, pc, t: K.adamax_step(p, g, s[0], s[1], 2e-3, 0.9, 0.999, 1e-8, 1e-2, t))
case("nadam", 2, lambda K, p, g, s, sc, pc, t: K.nadam_step(p, g, s[0], s[1], 2e-3, 0.9, 0.999, 1e-8, 1e-2, 4e-3, t,
                                                            [1.0, 0.45, 0.2][t]))
case("lars", 1, lambda K, p, g, s, sc, pc, t: K.lars_step(p, g, s[0], pc, sc[0], sc[1], 1.0, 0.9, 5e-4, 1e-3))
case("lamb", 2, lambda K, p, g, s, sc, pc, t: K.lamb_step(p, g, s[0], s[1], pc, sc[0], sc[1], 1e-2, 0.9, 0.999,
                                                          1e-6, 1e-2, t))
case("clip_scale", 0, lambda K, p, g, s, sc, pc, t: K.clip_scale(p, 0.5, 0.25))
case("clip_scale-no-clamp", 0, lambda K, p, g, s, sc, pc, t: K.clip_scale(p, math.inf, 0.5))

x = params0 * 3
for v in (0.5, math.inf):
    a, b = C.sum_sq_clipped(x, v), G.sum_sq_clipped(cuda.to_device(x), v)
    print(json.dumps({"case": f"sum_sq_clipped({v})", "ok": bool(np.allclose(a, b, rtol=1e-12)),
                      "worst_fraction_of_tolerance": float(max(abs(a[0] - b[0]) / a[0], abs(a[1] - b[1]) / a[1]))}))
# The public API on device="cuda": device state, pieces moved to the device, clipping on device arrays.
from hpcopt import optim
from hpcopt.config import OptimizerConfig
from hpcopt.optim.clip import clip_and_check
for name in ("adam", "lamb", "sgd"):
    ok, worst = True, 0.0
    res = {}
    for device in ("cpu", "cuda"):
        opt = optim.build(OptimizerConfig(name=name), segments, device=device)
        state = opt.init_state(n)
        p = params0.copy() if device == "cpu" else cuda.to_device(params0)
        for t, g in enumerate(grads0, start=1):
            g = g.copy() if device == "cpu" else cuda.to_device(g)
            norm, finite = clip_and_check(g, 5.0, 0.5)
            opt.step(p, g, state, t, opt.hp.lr)
        res[device] = (p if device == "cpu" else p.copy_to_host(), norm, finite)
    ok = bool(np.allclose(res["cuda"][0], res["cpu"][0], rtol=1e-6, atol=1e-7)) and res["cuda"][2]
    ok = ok and abs(res["cuda"][1] - res["cpu"][1]) <= 1e-12 * res["cpu"][1]
    print(json.dumps({"case": f"api-{name}", "ok": ok, "worst_fraction_of_tolerance": 0.0}))

a, b = C.sum_sq(x), G.sum_sq(cuda.to_device(x))
print(json.dumps({"case": "sum_sq", "ok": bool(np.isclose(a, b, rtol=1e-12)), "worst_fraction_of_tolerance": 0.0}))
x[17] = np.nan
print(json.dumps({"case": "sum_sq-nan", "ok": bool(math.isnan(G.sum_sq(cuda.to_device(x)))),
                  "worst_fraction_of_tolerance": 0.0}))
'''


@pytest.fixture(scope="module")
def sim_results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


EXPECTED = ["sgd", "sgd-momentum-wd", "sgd-nesterov", "adagrad", "rmsprop", "rmsprop-centered-momentum-wd",
            "adadelta", "adam", "adamw-amsgrad", "adamax", "nadam", "lars", "lamb", "clip_scale",
            "clip_scale-no-clamp", "sum_sq_clipped(0.5)", "sum_sq_clipped(inf)", "api-adam", "api-lamb", "api-sgd",
            "sum_sq", "sum_sq-nan"]


@pytest.mark.parametrize("case", EXPECTED)
def test_cuda_kernel_matches_cpu(sim_results, case):
    row = sim_results.get(case)
    assert row is not None, f"{case} did not run"
    assert row["ok"], row


def test_cpu_path_does_not_import_cuda():
    code = ("import sys, numpy as np\n"
            "from hpcopt import optim\nfrom hpcopt.config import OptimizerConfig\n"
            "from hpcopt.optim import clip\n"
            "o = optim.build(OptimizerConfig(name='adam'), [(0, 4)]); s = o.init_state(4)\n"
            "p = np.ones(4, np.float32); g = np.ones(4, np.float32); o.step(p, g, s, 1, 1e-3)\n"
            "clip.clip_and_check(g, 1.0, 0.5)\n"
            "assert 'hpcopt.kernels.optim_cuda' not in sys.modules\n"
            "assert not any(m.startswith('numba.cuda') for m in sys.modules), 'numba.cuda was imported'\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
