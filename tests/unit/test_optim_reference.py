"""Each optimizer against its reference: torch.optim where torch has it, a numpy transcription of the
paper for lars and lamb. 200 steps on a fixed, seeded gradient sequence; float32 parameters compared.

Tolerance (all comparisons): rtol 1e-5 with atol 1e-6. Both sides compute in float32 with the same update
rule, but not with bit-identical operation order (FMA contraction, torch's lerp formula), so each step
may differ by an ulp or two (~1e-7 relative); over 200 steps these round-off differences random-walk to a
few 1e-7, well inside 1e-5. atol 1e-6 covers the few parameters that pass near zero, where an absolute
round-off of the update size (~1e-7) is a large relative difference.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from hpcopt import optim
from hpcopt.config import OptimizerConfig
from hpcopt.errors import ConfigError

N = 10_000
STEPS = 200
RTOL, ATOL = 1e-5, 1e-6


def gradient_sequence(n: int = N, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, n), dtype=np.float32)


def initial_params(n: int = N, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def lr_at(opt, t: int) -> float:
    """A changing lr (as a schedule gives), so the kernels are checked with the lr passed per step."""
    return opt.hp.lr * (0.995 ** t)


def run_hpcopt(cfg: OptimizerConfig, params, grads_seq, segments=None):
    n = params.size
    opt = optim.build(cfg, segments or [(0, n)])
    p = params.copy()
    state = opt.init_state(n)
    for t, g in enumerate(grads_seq, start=1):
        g = g.copy()
        opt.step(p, g, state, t, lr_at(opt, t))
        np.testing.assert_array_equal(g, grads_seq[t - 1])  # grads are never written
    return opt, p, state


TORCH_CLASS = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop",
               "adadelta": "Adadelta", "adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}

CASES = [
    ("sgd", {}),
    ("sgd", dict(lr=0.05, weight_decay=1e-2)),
    ("sgd", dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("momentum", dict(lr=0.01)),
    ("momentum", dict(lr=0.02, momentum=0.5, dampening=0.5, weight_decay=1e-2)),
    ("nesterov", dict(lr=0.01)),
    ("nesterov", dict(lr=0.01, momentum=0.8, weight_decay=1e-3)),
    ("adagrad", {}),
    ("adagrad", dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2, eps=1e-8)),
    ("rmsprop", {}),
    ("rmsprop", dict(centered=True)),
    ("rmsprop", dict(lr=1e-3, momentum=0.9, weight_decay=1e-2)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=1e-3)),
    ("adadelta", {}),
    ("adadelta", dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=1e-2)),
    ("adam", {}),
    ("adam", dict(amsgrad=True)),
    ("adam", dict(lr=1e-2, betas=[0.8, 0.99], eps=1e-6, weight_decay=1e-2)),
    ("adamw", {}),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamax", {}),
    ("adamax", dict(lr=1e-2, betas=[0.8, 0.99], eps=1e-6, weight_decay=1e-2)),
    ("nadam", {}),
    ("nadam", dict(lr=1e-2, betas=[0.8, 0.99], weight_decay=1e-2, momentum_decay=1e-2)),
]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed: no reference to compare against")


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch(torch, name, settings):
    params, grads_seq = initial_params(), gradient_sequence()
    opt, ours, state = run_hpcopt(OptimizerConfig(name=name, **settings), params, grads_seq)

    kwargs = dataclasses.asdict(opt.hp)  # our resolved hyperparameters use torch's keyword names
    p = torch.nn.Parameter(torch.from_numpy(params.copy()))
    ref = getattr(torch.optim, TORCH_CLASS[name])([p], **kwargs)
    for t, g in enumerate(grads_seq, start=1):
        ref.param_groups[0]["lr"] = lr_at(opt, t)
        p.grad = torch.from_numpy(g.copy())
        ref.step()
    np.testing.assert_allclose(ours, p.detach().numpy(), rtol=RTOL, atol=ATOL)
    # The state arrays carry torch's names and values (what a checkpoint stores).
    torch_state = ref.state[p]
    for key, arr in state.items():
        np.testing.assert_allclose(arr, torch_state[key].numpy(), rtol=RTOL, atol=ATOL, err_msg=key)


def test_defaults_are_torchs(torch):
    for name, cls_name in TORCH_CLASS.items():
        sig = inspect.signature(getattr(torch.optim, cls_name).__init__).parameters
        for key, ours in optim.DEFAULTS[name].items():
            if name in ("momentum", "nesterov") and key in ("momentum", "nesterov"):
                continue  # torch.optim.SGD has no momentum by default; these names mean momentum
            if name in ("sgd", "momentum", "nesterov") and key == "lr":
                continue  # hpcopt's one documented departure (torch's 1e-3 barely trains): see sgd.py
            theirs = sig[key].default
            assert tuple(theirs) == ours if key == "betas" else theirs == ours, (name, key, ours, theirs)


# ---------------------------------------------------------------------------------------------
# lars and lamb: plain-numpy transcriptions of the papers, in float64 (our float32 kernels must agree to
# the tolerance above; the reference is the exact rule, not a copy of our op order).

def lars_reference(w, grads_seq, segments, lr_of_t, momentum, weight_decay, eta):
    """You et al. 2017, "Large Batch Training of Convolutional Networks", Algorithm 1."""
    w = w.astype(np.float64)
    v = np.zeros_like(w)
    for t, g in enumerate(grads_seq, start=1):
        g = g.astype(np.float64)
        for off, n in segments:
            s = slice(off, off + n)
            w_norm, g_norm = np.linalg.norm(w[s]), np.linalg.norm(g[s])
            local_lr = eta * w_norm / (g_norm + weight_decay * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
            v[s] = momentum * v[s] + lr_of_t(t) * local_lr * (g[s] + weight_decay * w[s])
            w[s] = w[s] - v[s]
    return w


def lamb_reference(x, grads_seq, segments, lr_of_t, beta1, beta2, eps, weight_decay):
    """You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    Algorithm 2 (with bias correction, phi = identity)."""
    x = x.astype(np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t, g in enumerate(grads_seq, start=1):
        g = g.astype(np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        r = m_hat / (np.sqrt(v_hat) + eps)
        for off, n in segments:
            s = slice(off, off + n)
            u = r[s] + weight_decay * x[s]
            x_norm, u_norm = np.linalg.norm(x[s]), np.linalg.norm(u)
            ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
            x[s] = x[s] - lr_of_t(t) * ratio * u
    return x


def layered(n: int = N):
    """Segments like an MLP's (weights, biases) in shuffled order, one empty, zero biases at the start."""
    sizes = [6400, 100, 3000, 0, 490, 10]
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    segments = list(zip(offs.tolist(), sizes))
    rng = np.random.default_rng(3)
    segments = [segments[i] for i in rng.permutation(len(segments))]
    params = initial_params(sum(sizes))
    for off, size in segments:
        if size in (100, 10):
            params[off:off + size] = 0.0  # biases start at zero: the ratio-1 branch
    return segments, params


@pytest.fixture(params=[None, 1000], ids=["one-piece", "many-pieces"])
def chunk(request, monkeypatch):
    """Also split layers into pieces smaller than the layers, as large models are."""
    if request.param:
        from hpcopt.optim import lars
        monkeypatch.setitem(lars.CHUNK, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("settings", [{}, dict(lr=0.5, momentum=0.8, weight_decay=5e-4, trust_coefficient=2e-2)])
def test_lars_matches_paper(chunk, settings):
    segments, params = layered()
    grads_seq = gradient_sequence(params.size)
    opt, ours, _ = run_hpcopt(OptimizerConfig(name="lars", **settings), params, grads_seq, segments)
    hp = opt.hp
    ref = lars_reference(params, grads_seq, segments, lambda t: lr_at(opt, t), hp.momentum, hp.weight_decay,
                         hp.trust_coefficient)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("settings", [{}, dict(lr=1e-2, betas=[0.8, 0.99], eps=1e-8, weight_decay=0.1)])
def test_lamb_matches_paper(chunk, settings):
    segments, params = layered()
    grads_seq = gradient_sequence(params.size)
    opt, ours, _ = run_hpcopt(OptimizerConfig(name="lamb", **settings), params, grads_seq, segments)
    hp = opt.hp
    ref = lamb_reference(params, grads_seq, segments, lambda t: lr_at(opt, t), hp.betas[0], hp.betas[1], hp.eps,
                         hp.weight_decay)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Registry, defaults and config errors.

def test_every_configured_name_is_registered():
    from hpcopt.config import OPTIMIZERS
    assert set(optim.REGISTRY) == set(OPTIMIZERS) == set(optim.DEFAULTS) == set(optim.STATE_NAMES)


def test_state_names_are_stable():
    expect = {"sgd": (), "momentum": ("momentum_buffer",), "adagrad": ("sum",), "adam": ("exp_avg", "exp_avg_sq"),
              "adamax": ("exp_avg", "exp_inf"), "adadelta": ("square_avg", "acc_delta"),
              "lamb": ("exp_avg", "exp_avg_sq")}
    for name, names in expect.items():
        opt = optim.build(OptimizerConfig(name=name), [(0, 10)])
        state = opt.init_state(10)
        assert tuple(state) == names
        assert all(a.dtype == np.float32 and a.shape == (10,) for a in state.values())
    opt = optim.build(OptimizerConfig(name="rmsprop", momentum=0.9, centered=True), [(0, 10)])
    assert set(opt.init_state(10)) == {"square_avg", "momentum_buffer", "grad_avg"}
    opt = optim.build(OptimizerConfig(name="adagrad", initial_accumulator_value=0.5), [(0, 4)])
    np.testing.assert_array_equal(opt.init_state(4)["sum"], np.full(4, 0.5, np.float32))


@pytest.mark.parametrize("settings,words", [
    (dict(name="sgd", betas=[0.9, 0.99]), "optimizer.betas does not apply to sgd"),
    (dict(name="adam", momentum=0.9), "optimizer.momentum does not apply to adam"),
    (dict(name="nesterov", nesterov=False), "contradicts"),
    (dict(name="sgd", nesterov=True), "nesterov momentum needs"),
    (dict(name="nesterov", dampening=0.5), "nesterov momentum needs"),
    (dict(name="momentum", momentum=0.0), "must be > 0"),
])
def test_config_errors_are_one_line(settings, words):
    with pytest.raises(ConfigError, match=words) as err:
        optim.build(OptimizerConfig(**settings), [(0, 10)], source="job.toml")
    assert str(err.value).startswith("job.toml: ") and "\n" not in str(err.value)


def test_segments_must_tile():
    with pytest.raises(ValueError, match="tile"):
        optim.build(OptimizerConfig(name="lars"), [(0, 10), (12, 5)])
    with pytest.raises(ValueError, match="cover"):
        optim.build(OptimizerConfig(name="lamb"), [(0, 10)]).init_state(11)


def test_nadam_mu_product_does_not_depend_on_call_history():
    opt = optim.build(OptimizerConfig(name="nadam"), [(0, 1)])
    sequential = [opt.mu_product(t) for t in range(1, 60)]
    fresh = optim.build(OptimizerConfig(name="nadam"), [(0, 1)])
    assert [fresh.mu_product(t) for t in range(59, 0, -1)][::-1] == sequential
