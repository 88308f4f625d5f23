"""Every layer and loss passes a finite-difference gradient check in float64."""
import numpy as np
import pytest

from hpcopt.nn import MLP


def numeric_grad(model: MLP, x, y, h=1e-6):
    """Central differences of the mean loss w.r.t. every parameter of the flat buffer."""
    p = model.flat.data
    g = np.empty_like(p)
    scratch_batch = len(x)
    for i in range(p.size):
        old = p[i]
        p[i] = old + h
        lp = model.loss_and_grad(x, y, scratch_batch) / scratch_batch
        p[i] = old - h
        lm = model.loss_and_grad(x, y, scratch_batch) / scratch_batch
        p[i] = old
        g[i] = (lp - lm) / (2 * h)
    return g


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_backward_matches_finite_differences(activation, loss):
    rng = np.random.default_rng(1)
    model = MLP([5, 7, 6, 4], activation=activation, loss=loss, dtype="float64", seed=3)
    x = rng.standard_normal((9, 5))
    y = rng.integers(0, 4, 9)
    model.loss_and_grad(x, y, len(x))  # loss gradient scaled by 1/B: the mean loss's gradient
    analytic = model.flat.grad.copy()
    numeric = numeric_grad(model, x, y)
    # float64 central differences with h=1e-6 are accurate to ~1e-9; 1e-6 leaves room for ReLU kinks
    # being crossed by no sample (inputs are continuous random values, so none sits within h of 0).
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert np.abs(analytic).max() > 1e-3  # the check is not vacuous


def test_flat_buffer_views_share_memory():
    model = MLP([3, 4, 2], seed=0)
    w = model.flat.param("dense0.weight")
    assert w.shape == (3, 4) and np.shares_memory(w, model.flat.data)
    assert np.shares_memory(model.flat.grad_of("dense1.bias"), model.flat.grad)
    # backward order: the last layer's tensors come first, so early gradient buckets finish first
    assert model.flat.keys()[:2] == ["dense1.weight", "dense1.bias"]
    assert sum(n for _, n in model.flat.segments()) == model.flat.size == 3 * 4 + 4 + 4 * 2 + 2


def test_init_does_not_depend_on_other_layers():
    """Layer init is keyed by (seed, layer index): a layer's weights are the same in any model shape."""
    a = MLP([8, 16, 4], seed=5).flat.param("dense0.weight")
    b = MLP([8, 16, 16, 3], seed=5).flat.param("dense0.weight")
    np.testing.assert_array_equal(a, b)


def test_softmax_ce_value_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    from hpcopt.nn.losses import softmax_ce

    d = np.empty_like(logits)
    total = softmax_ce(logits, y, 6, d)
    ref = -(logits[np.arange(6), y] - np.log(np.exp(logits).sum(1))).sum()
    assert total == pytest.approx(ref, rel=1e-12)  # same math in float64
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p[np.arange(6), y] -= 1
    np.testing.assert_allclose(d, p / 6, rtol=1e-12)
