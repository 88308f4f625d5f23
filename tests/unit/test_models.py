"""General models (hpcopt/modelspec.py, nn/build.py, nn/stage.py): the layer table and the builders
agree, shape errors are one line at load, float64 finite differences through activations, gelu/silu
layers and residual blocks, a whole residual CNN equal to PyTorch in float32 (loss, every gradient,
running statistics, evaluation), and a pipeline cut and a data-parallel split equal to the whole."""
import os
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcopt import config, modelspec
from hpcopt.errors import ConfigError
from hpcopt.modelspec import LAYERS, Unit
from hpcopt.nn import Model
from hpcopt.nn.build import Residual, build_layer, leaves
from hpcopt.nn.layers import EVAL, TRAIN, Ctx, Dense
from hpcopt.nn.layers2d import (Activation, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dropout, Flatten,
                                GlobalAvgPool, LayerNorm, MaxPool2d, dropout_mask)
from hpcopt.nn.params import FlatParams
from hpcopt.nn.stage import Stage


def layer_list(*tables: str) -> str:
    """The override `model.layer=[...]` of TOML inline tables."""
    return "model.layer=[" + ", ".join(tables) + "]"


def spec_of(input_shape, *tables: str) -> modelspec.Spec:
    cfg = config.load(None, [f"model.input={list(input_shape)}", layer_list(*tables)])
    return modelspec.from_config(cfg.model, cfg.source)


def load_error(*overrides: str) -> str:
    """The ConfigError message of config.load(None, overrides), checked to be one line."""
    with pytest.raises(ConfigError) as e:
        config.load(None, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert e.value.exit_code == 2
    return msg


# ================================================================ (a) the layer table and the builders agree

# type -> (input, layer tables) building a model that holds a layer of that type; every type of LAYERS
EXAMPLES = {
    "dense": ([5], ['{type="dense",units=3,activation="tanh"}']),
    "conv2d": ([2, 6, 5], ['{type="conv2d",channels=3,kernel=[3,2],stride=[2,1],padding=1,dilation=[1,2]}']),
    "conv1d": ([2, 9], ['{type="conv1d",channels=3,kernel=3,stride=2,padding=1,dilation=2,activation="silu"}']),
    "maxpool2d": ([2, 6, 6], ['{type="maxpool2d",kernel=3,stride=2,padding=1}']),
    "avgpool2d": ([2, 6, 6], ['{type="avgpool2d",kernel=2}']),
    "global_avgpool": ([3, 4, 4], ['{type="global_avgpool"}']),
    "flatten": ([3, 4, 4], ['{type="flatten"}']),
    "activation": ([3, 4], ['{type="activation",function="gelu"}']),
    "layernorm": ([3, 4, 4], ['{type="layernorm",eps=1e-3}']),
    "batchnorm": ([3, 4, 4], ['{type="batchnorm",momentum=0.2}']),
    "dropout": ([7], ['{type="dropout",p=0.5}']),
    "residual": ([4], ['{type="residual",layers=[{type="dense",units=4}]}']),
}

LEAF_CLASS = {"dense": Dense, "conv2d": Conv2d, "conv1d": Conv1d, "maxpool2d": MaxPool2d, "avgpool2d": AvgPool2d,
              "global_avgpool": GlobalAvgPool, "flatten": Flatten, "activation": Activation,
              "layernorm": LayerNorm, "batchnorm": (BatchNorm2d, BatchNorm1d), "dropout": Dropout,
              "residual": Residual}

# every layer type in one model: conv2d, batchnorm (3-D and 1-D), residuals without a projection, with a
# strided 1x1 conv projection and with a dense one, both poolings, dropout, layernorm, activation, flatten
ALL_TYPES = ([2, 8, 8], [
    '{type="conv2d",channels=4,kernel=3,padding=1,activation="gelu"}',
    '{type="batchnorm"}',
    '{type="activation",function="relu"}',
    '{type="residual",layers=[{type="conv2d",channels=4,kernel=3,padding=1},{type="layernorm"}]}',
    '{type="residual",layers=[{type="conv2d",channels=6,kernel=3,padding=1,stride=2},{type="batchnorm"}]}',
    '{type="maxpool2d",kernel=2}',
    '{type="avgpool2d",kernel=2,stride=1}',
    '{type="dropout",p=0.5}',
    '{type="global_avgpool"}',
    '{type="batchnorm"}',
    '{type="residual",layers=[{type="dense",units=5,activation="silu"},{type="batchnorm"}]}',
    '{type="flatten"}',
    '{type="dense",units=3}',
])
# conv1d needs a [channels, length] input: with an identity residual and a strided conv1d projection
CONV1D = ([2, 9], [
    '{type="conv1d",channels=3,kernel=3,padding=1,activation="tanh"}',
    '{type="residual",layers=[{type="conv1d",channels=3,kernel=3,padding=1},{type="layernorm"}]}',
    '{type="residual",layers=[{type="conv1d",channels=4,kernel=3,stride=2,padding=1}]}',
    '{type="dropout",p=0.25}',
    '{type="flatten"}',
    '{type="batchnorm"}',
    '{type="dense",units=2}',
])


def check_model_matches_spec(spec: modelspec.Spec) -> Model:
    model = Model(spec, dtype="float64", seed=3)
    assert [(s.key, s.shape) for s in model.flat.specs] == modelspec.tensors(spec)
    assert [(s.key, s.shape) for s in model.buffers.specs] == modelspec.buffers(spec)
    for u in spec.walk():
        if u.type == "batchnorm":   # buffers start at running mean 0, variance 1
            assert (model.buffers.param(f"{u.name}.running_mean") == 0).all()
            assert (model.buffers.param(f"{u.name}.running_var") == 1).all()
        if u.type in ("layernorm", "batchnorm"):   # norms start as the identity
            assert (model.flat.param(f"{u.name}.weight") == 1).all()
            assert (model.flat.param(f"{u.name}.bias") == 0).all()
    assert model.flat.size == spec.n_params() == sum(spec.params_of(u) for u in spec.units)
    # every layer of the spec is a leaf of the model under its name, the leaf class its type's
    built = {leaf.name: leaf for layer in model.layers for leaf in leaves(layer)}
    for u in spec.walk():
        if u.type == "residual":   # its only leaf of its own name: the projection, if any
            if u.projection:
                assert isinstance(built[u.name], Conv2d if u.projection == "conv" else Dense)
                assert built[u.name].index == u.index
            else:
                assert u.name not in built
            continue
        assert isinstance(built[u.name], LEAF_CLASS[u.type]), u.name
        assert built[u.name].index == u.index
        if u.type == "batchnorm":   # over channels of images, or over features of vectors
            assert type(built[u.name]) is (BatchNorm2d if len(u.in_shape) == 3 else BatchNorm1d)
    # the model runs: an output of the spec's shape
    x = np.random.default_rng(0).standard_normal((4, *spec.input))
    out = model.forward(x, ctx=Ctx(step=1))[-1]
    assert out.shape == (4, *spec.output)
    return model


def test_every_layer_type_has_an_example_and_builds():
    assert set(EXAMPLES) == set(LAYERS), "a layer type of modelspec.LAYERS without an example here (or vice versa)"
    for t, (shape, tables) in EXAMPLES.items():
        spec = spec_of(shape, *tables)
        assert spec.units[0].type == t
        for u in spec.walk():
            layer = build_layer(u, seed=1)
            cls = LEAF_CLASS[u.type]
            assert isinstance(layer, cls), (t, type(layer))
            assert layer.index == u.index
            assert tuple(layer.out_shape(u.in_shape)) == u.out_shape, (t, u.name)
        check_model_matches_spec(spec)
    with pytest.raises(ValueError, match="no layer of type 'conv3d'"):
        build_layer(Unit("conv3d", 0, {}, (3, 4, 4, 4), (3, 4, 4, 4)))


@pytest.mark.parametrize("example", [ALL_TYPES, CONV1D], ids=["all_types", "conv1d"])
def test_model_tensors_and_buffers_equal_the_spec(example):
    spec = spec_of(example[0], *example[1])
    used = {u.type for u in spec.walk()}
    if example is ALL_TYPES:
        assert used == set(LAYERS) - {"conv1d"}
        projections = sorted(u.projection for u in spec.walk() if u.type == "residual")
        assert projections == ["", "conv", "dense"]
        bn = [u for u in spec.walk() if u.type == "batchnorm"]
        assert sorted(len(u.in_shape) for u in bn) == [1, 1, 3, 3]
    else:
        assert [(u.projection, u.proj_stride) for u in spec.walk() if u.type == "residual"] == [("", 1), ("conv", 2)]
    check_model_matches_spec(spec)


def test_names_and_projection_tensors():
    """Names are type + model-wide depth-first index; a residual's projection is keyed by the block's
    name, (C_out, C_in, 1, 1) for a conv projection, (n_in, n_out) for a dense one."""
    spec = spec_of(ALL_TYPES[0], *ALL_TYPES[1])
    names = [u.name for u in spec.walk()]
    assert names[:8] == ["conv2d0", "batchnorm1", "activation2", "residual3", "conv2d4", "layernorm5",
                         "residual6", "conv2d7"]
    shapes = dict(modelspec.tensors(spec))
    assert shapes["residual6.weight"] == (6, 4, 1, 1) and shapes["residual6.bias"] == (6,)
    assert "residual3.weight" not in shapes                    # identity skip: no tensors
    dense_res = next(u for u in spec.walk() if u.type == "residual" and u.projection == "dense")
    assert shapes[f"{dense_res.name}.weight"] == (6, 5)
    assert shapes["conv2d0.weight"] == (4, 2, 3, 3) and shapes["layernorm5.weight"] == (4, 8, 8)
    # the MLP form keeps the names dense0, dense1, ...
    mlp = modelspec.from_widths([4, 8, 3])
    assert modelspec.tensors(mlp) == [("dense1.weight", (8, 3)), ("dense1.bias", (3,)),
                                      ("dense0.weight", (4, 8)), ("dense0.bias", (8,))]


def test_docs_layer_table_follows_the_layer_table():
    """docs/models.md lists every type and key of modelspec.LAYERS, in its order, with its default."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "models.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    rows = rows[:next(i for i, r in enumerate(rows) if r[1].startswith("`[") or r[1] == "any")]  # the first table
    documented = [(r[0].strip("`"), r[1].strip("`"), r[3]) for r in rows]
    expected = []
    for t, keys in LAYERS.items():
        if not keys:
            expected.append((t, "—", ""))
        for k, key in keys.items():
            default = "required" if key.default is modelspec.REQUIRED else (
                f'`"{key.default}"`' if isinstance(key.default, str) else f"`{key.default:g}`"
                if isinstance(key.default, float) else f"`{key.default}`")
            expected.append((t, k, default))
    assert documented == expected

# ================================================================ (b) errors at load: one line each

@pytest.mark.parametrize("input_shape,tables,expect", [
    ([1, 8, 8], ['{type="conv2d",channels=4,kernel=3,padding=1}', '{type="batchnorm"}',
                 '{type="activation",function="relu"}', '{type="dense",units=10}'],
     [r"dense3 \(dense\)", r"\[features\]", r"\[4, 8, 8\]", "flatten"]),
    ([1, 8, 8], ['{type="conv1d",channels=4,kernel=3}'],
     [r"conv1d0 \(conv1d\)", r"\[channels, length\]", r"\[1, 8, 8\]"]),
    ([8], ['{type="conv2d",channels=4,kernel=3}'], [r"conv2d0", r"\[channels, height, width\]", r"\[8\]"]),
    ([2, 8], ['{type="maxpool2d",kernel=2}'], [r"maxpool2d0", r"\[2, 8\]"]),
    ([2, 8], ['{type="batchnorm"}'], [r"batchnorm0", r"\[features\] or \[channels, height, width\]", r"\[2, 8\]"]),
    ([1, 4, 4], ['{type="conv2d",channels=2,kernel=5}'], [r"conv2d0", "kernel 5", r"\[1, 4, 4\]"]),
    # a residual whose body maps 8x8 to 6x6: no stride of a 1x1 convolution does that
    ([4, 8, 8], ['{type="residual",layers=[{type="conv2d",channels=8,kernel=3}]}'],
     [r"residual0 \(residual\)", r"\[4, 8, 8\] to \[8, 6, 6\]", "1x1 projection"]),
    # ... nor one of an image onto a vector
    ([4, 2, 2], ['{type="residual",layers=[{type="flatten"}]}'], [r"residual0", r"\[4, 2, 2\] to \[16\]"]),
    # the error names the nested layer
    ([4], ['{type="dense",units=4}', '{type="residual",layers=[{type="dense",units=4},{type="global_avgpool"}]}'],
     [r"global_avgpool3", r"\[4\]"]),
])
def test_shape_mismatch_is_one_line_naming_the_layer_and_shapes(input_shape, tables, expect):
    msg = load_error(f"model.input={input_shape}", layer_list(*tables))
    assert msg.startswith("<defaults>: layer "), msg   # validate() names the job's source
    for pattern in expect:
        assert re.search(pattern, msg), (pattern, msg)


@pytest.mark.parametrize("table,expect", [
    ('{type="conv3d",channels=4}', ["model.layer[0].type must be one of dense, conv2d", "'conv3d'"]),
    ('{channels=4}', ["model.layer[0].type must be one of", "None"]),
    ('{type="conv2d",channels=4,kernel=3,filters=8}', ["(conv2d0)", "unknown key 'filters'", "keys of conv2d"]),
    ('{type="flatten",p=0.5}', ["(flatten0)", "unknown key 'p'", "none"]),
    ('{type="conv2d",channels=4}', ["(conv2d0) needs kernel"]),
    ('{type="dense"}', ["(dense0) needs units"]),
    ('{type="residual"}', ["(residual0) needs layers"]),
    ('{type="residual",layers=[]}', ["(residual0).layers must be a non-empty list"]),
    ('{type="conv2d",channels=0,kernel=3}', ["(conv2d0).channels must be an integer >= 1 (got 0)"]),
    ('{type="conv2d",channels=4,kernel=[3,3,3]}', ["(conv2d0).kernel must be an integer or [h, w]"]),
    ('{type="conv2d",channels=4,kernel=3,stride=1.5}', ["(conv2d0).stride must be an integer or [h, w] >= 1"]),
    ('{type="conv1d",channels=4,kernel=[3,3]}', ["(conv1d0).kernel must be an integer >= 1"]),
    ('{type="conv2d",channels=4,kernel=3,activation="swish"}', ["(conv2d0).activation must be one of identity, relu"]),
    ('{type="activation",function="identity"}', ["(activation0).function must be one of relu, tanh"]),
    ('{type="dropout",p=1.0}', ["(dropout0).p must be a number >= 0 and < 1 (got 1.0)"]),
    ('{type="batchnorm",momentum="fast"}', ["(batchnorm0).momentum must be a number"]),
    ('{type="maxpool2d",kernel=2,padding=2}', ["(maxpool2d0).padding = 2 exceeds half the kernel 2"]),
    ('"dense"', ["model.layer must be a list of tables"]),
])
def test_bad_layer_table_is_one_line(table, expect):
    msg = load_error("model.input=[1, 4, 4]", layer_list(table))
    for text in expect:
        assert text in msg, (text, msg)


def test_nested_layer_errors_name_the_path():
    msg = load_error("model.input=[4]", layer_list('{type="residual",layers=[{type="dense",unit=3}]}'))
    assert "model.layer[0] (residual0).layers[0] (dense1): unknown key 'unit'" in msg


def test_the_two_model_forms_do_not_mix():
    table = layer_list('{type="dense",units=3}')
    msg = load_error("model.input=[4]", table, "model.layers=[4, 3]")
    assert "model.layers belongs to the MLP form" in msg
    msg = load_error("model.input=[4]", table, 'model.activation="tanh"')
    assert "model.activation belongs to the MLP form" in msg
    msg = load_error("model.input=[1, 8, 8]")
    assert "model.input applies to the model.layer list only" in msg
    msg = load_error(table)
    assert "model.layer needs model.input" in msg
    msg = load_error("model.input=[1, 2, 3, 4]", table)
    assert "at most 3" in msg
    # the default model.layers with model.layer is fine, and so is the MLP form alone
    config.load(None, ["model.input=[4]", table, "model.layers=[64, 128, 10]"])
    spec = modelspec.from_config(config.load(None, ["model.layers=[4, 6, 3]"]).model, "x")
    assert spec.mlp and [u.name for u in spec.units] == ["dense0", "dense1"]


def test_config_round_trips_through_the_checkpoint_text():
    """The resolved config (stored in checkpoints) gives the same model description back."""
    cfg = config.load(None, [f"model.input={ALL_TYPES[0]}", layer_list(*ALL_TYPES[1])])
    again = config.from_toml_text(config.to_toml(cfg), "ckpt")
    a, b = modelspec.from_config(cfg.model, "a"), modelspec.from_config(again.model, "b")
    assert a.describe() == b.describe()
    other = spec_of(ALL_TYPES[0], *ALL_TYPES[1][:3], '{type="flatten"}', '{type="dense",units=3}')
    assert modelspec.difference(a, other).startswith('layer 3 is {"type":"residual","layers":[{"type":"conv2d"')
    assert modelspec.difference(a, other).endswith('in the checkpoint, {"type":"flatten"} in the job')


# ================================================================ (c) finite differences (float64)

def numeric(f, buf: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() over every element of buf (perturbed in place)."""
    flat = buf.reshape(-1)
    out = np.empty(flat.size)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        lp = f()
        flat[i] = old - h
        lm = f()
        flat[i] = old
        out[i] = (lp - lm) / (2 * h)
    return out


def assert_fd(analytic: np.ndarray, numeric_: np.ndarray) -> None:
    # float64 central differences with h=1e-6: truncation ~1e-12, rounding ~eps·|L|/h ~1e-9; rtol 1e-6 with
    # atol 1e-8 sits well above both and far below any real error (as test_layers2d)
    np.testing.assert_allclose(analytic.reshape(-1), numeric_, rtol=1e-6, atol=1e-8)
    assert np.abs(numeric_).max() > 1e-3   # not vacuous


def layer_fd(layer, x, rng, ctx=TRAIN):
    """L = sum(y·R): backward's dx and parameter gradients against central differences."""
    flat = FlatParams(layer.param_specs(), np.float64)
    layer.bind(flat)
    layer.init(np.random.default_rng(0), "xavier")
    flat.data[:] += rng.standard_normal(flat.size) * 0.1     # biases not zero
    y, saved = layer.forward(x, ctx)
    R = rng.standard_normal(y.shape)
    dx = layer.backward(saved, R.copy(), True, ctx=ctx)

    def loss():
        return float(np.sum(layer.forward(x, ctx)[0] * R))

    assert_fd(dx, numeric(loss, x))
    if flat.size:
        assert_fd(flat.grad.copy(), numeric(loss, flat.data))
    return y, saved


def away_from_zero(rng, shape):
    """Random values with |v| >= 0.1: no ReLU kink within h."""
    v = rng.standard_normal(shape)
    return np.sign(v) * (0.1 + np.abs(v))


@pytest.mark.parametrize("function", ["relu", "tanh", "sigmoid", "gelu", "silu"])
def test_activation_layer_gradcheck(function):
    rng = np.random.default_rng(30)
    layer = Activation("act", function)
    x = away_from_zero(rng, (3, 2, 3, 4)) * 1.5
    y, saved = layer_fd(layer, x, rng)
    ref = {"relu": np.maximum(x, 0), "tanh": np.tanh(x), "sigmoid": 1 / (1 + np.exp(-x)),
           "silu": x / (1 + np.exp(-x)), "gelu": None}[function]
    if ref is not None:
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(saved, x)   # the derivative is taken at the input


@pytest.mark.parametrize("function", ["gelu", "silu"])
def test_dense_and_conv_with_gelu_silu_gradcheck(function):
    rng = np.random.default_rng(31)
    dense = Dense("dense0", 5, 4, function)
    x = rng.standard_normal((3, 5)) * 1.5
    y, saved = layer_fd(dense, x, rng)
    z = x @ dense.W + dense.b
    np.testing.assert_allclose(saved[1], z, rtol=1e-12)       # the pre-activation is kept
    # with a preallocated output (a pipeline's buffer), the buffer keeps z and the activation is new
    buf = np.empty((3, 4))
    a, s = dense.forward(x, TRAIN, out=buf)
    np.testing.assert_allclose(buf, z, rtol=1e-12)
    assert a is not buf and s[1] is buf
    np.testing.assert_allclose(a, y, rtol=1e-15)

    conv = Conv2d("conv2d0", 2, 3, 3, stride=2, padding=1, activation=function)
    x = rng.standard_normal((2, 2, 5, 6))
    y, saved = layer_fd(conv, x, rng)
    xt = torch.tensor(x)
    zt = F.conv2d(xt, torch.tensor(conv.W), torch.tensor(conv.b), 2, 1).numpy()
    np.testing.assert_allclose(saved[1], zt, rtol=1e-10, atol=1e-12)
    ref = F.gelu(torch.tensor(zt)) if function == "gelu" else F.silu(torch.tensor(zt))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-12)


def stage_fd(stage: Stage, x: np.ndarray, rng, ctx: Ctx):
    """L = sum(out·R) through a whole stage (need_dx=True): input and parameter gradients against
    central differences. Parameters are perturbed off the init's (norm scales 1, biases 0)."""
    stage.flat.data[:] += rng.standard_normal(stage.flat.size) * 0.1
    for leaf in stage.by_name.values():
        if isinstance(leaf, BatchNorm2d):
            leaf.momentum = 0.0   # (many forwards; training mode uses batch statistics anyway)
    trace = stage.forward(x, ctx=ctx)
    R = rng.standard_normal(trace[-1].shape)
    dx = stage.backward(trace, R.copy(), need_dx=True, ctx=ctx)
    grads = stage.flat.grad.copy()

    def loss():
        return float(np.sum(stage.forward(x, ctx=ctx)[-1] * R))

    assert_fd(dx, numeric(loss, x))
    assert_fd(grads, numeric(loss, stage.flat.data))


@pytest.mark.parametrize("input_shape,tables,projection", [
    # identity skip: the body keeps the shape
    ([2, 4, 5], ['{type="residual",layers=[{type="conv2d",channels=2,kernel=3,padding=1,activation="gelu"},'
                 '{type="batchnorm"}]}'], ""),
    # a dense projection: the body maps 5 features to 4
    ([5], ['{type="residual",layers=[{type="dense",units=6,activation="silu"},{type="batchnorm"},'
           '{type="dense",units=4,activation="tanh"}]}'], "dense"),
    # a strided 1x1 conv projection around nested layers: conv (stride 2), batchnorm, activation, an inner
    # identity residual holding its own batchnorm
    ([2, 6, 5], ['{type="residual",layers=[{type="conv2d",channels=3,kernel=3,padding=1,stride=2},'
                 '{type="batchnorm"},{type="activation",function="gelu"},'
                 '{type="residual",layers=[{type="conv2d",channels=3,kernel=3,padding=1,activation="silu"},'
                 '{type="batchnorm"}]}]}'], "conv"),
    # conv1d: a strided 1x1 conv1d projection
    ([2, 7], ['{type="residual",layers=[{type="conv1d",channels=3,kernel=3,padding=1,stride=2},'
              '{type="activation",function="tanh"}]}'], "conv"),
    # the sum's fused activation, and batch norm's (derivatives from the outputs)
    ([2, 4, 5], ['{type="residual",activation="tanh",layers=[{type="conv2d",channels=2,kernel=3,padding=1},'
                 '{type="batchnorm",activation="sigmoid"},{type="conv2d",channels=2,kernel=3,padding=1}]}'], ""),
    ([5], ['{type="residual",activation="sigmoid",layers=[{type="dense",units=4,activation="silu"}]}'], "dense"),
])
def test_residual_gradcheck(input_shape, tables, projection):
    rng = np.random.default_rng(32)
    spec = spec_of(input_shape, *tables)
    assert spec.units[0].projection == projection
    model = Model(spec, dtype="float64", seed=4)
    x = rng.standard_normal((3, *input_shape))
    stage_fd(model, x, rng, Ctx(step=2))


def test_mixed_model_softmax_ce_gradcheck():
    """Every layer type in one small model, through loss_and_grad (softmax cross-entropy, mean)."""
    rng = np.random.default_rng(33)
    spec = spec_of([2, 4, 4], '{type="conv2d",channels=3,kernel=3,padding=1,activation="gelu"}',
                   '{type="batchnorm"}', '{type="activation",function="silu"}',
                   '{type="residual",layers=[{type="conv2d",channels=4,kernel=3,padding=1,stride=2},'
                   '{type="layernorm"}]}',
                   '{type="maxpool2d",kernel=2,stride=1}', '{type="avgpool2d",kernel=1}',
                   '{type="dropout",p=0.3}', '{type="flatten"}', '{type="batchnorm"}',
                   '{type="residual",layers=[{type="dense",units=3,activation="tanh"}]}',
                   '{type="dense",units=3}')
    model = Model(spec, dtype="float64", seed=5)
    model.flat.data[:] += rng.standard_normal(model.flat.size) * 0.1
    for leaf in model.by_name.values():
        if isinstance(leaf, BatchNorm2d):
            leaf.momentum = 0.0
    x, y = rng.standard_normal((5, 32)), rng.integers(0, 3, 5)    # flat data rows, reshaped by the stage
    ctx = Ctx(step=3, first_row=7)
    model.loss_and_grad(x, y, len(x), ctx=ctx)
    analytic = model.flat.grad.copy()
    assert_fd(analytic, numeric(lambda: model.loss_and_grad(x, y, len(x), ctx=ctx) / len(x), model.flat.data))


# ================================================================ (d) a whole residual CNN against PyTorch (float32)

CNN = ([3, 8, 8], [
    '{type="conv2d",channels=8,kernel=3,padding=1}',                        # conv2d0
    '{type="batchnorm"}',                                                   # batchnorm1
    '{type="activation",function="relu"}',                                  # activation2
    '{type="residual",layers=[{type="conv2d",channels=8,kernel=3,padding=1},{type="batchnorm"},'   # residual3 ...
    '{type="activation",function="gelu"},{type="conv2d",channels=16,kernel=3,padding=1,stride=2},'
    '{type="batchnorm"}]}',                                                 # ... conv2d4 .. batchnorm8
    '{type="activation",function="silu"}',                                  # activation9
    '{type="maxpool2d",kernel=2}',                                          # maxpool2d10
    '{type="layernorm"}',                                                   # layernorm11
    '{type="dropout",p=0.25}',                                              # dropout12
    '{type="flatten"}',                                                     # flatten13
    '{type="dense",units=10}',                                              # dense14
])
BIAS_INTO_BN = ("conv2d0.bias", "conv2d4.bias", "conv2d7.bias")


def close(ours, ref):
    """float32 vs torch (as test_layers2d): rtol 1e-5 with atol 1e-5·max|ref|."""
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(np.abs(ref).max(), 1e-30))


def torch_cnn(P: dict, x, running: dict, training: bool, mask=None):
    """The CNN spec in torch.nn.functional; P: torch tensors in torch's layouts."""
    def bn(h, name):
        return F.batch_norm(h, running[f"{name}.running_mean"], running[f"{name}.running_var"], P[f"{name}.weight"],
                            P[f"{name}.bias"], training=training, momentum=0.1, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, P["conv2d0.weight"], P["conv2d0.bias"], padding=1), "batchnorm1"))
    r = F.gelu(bn(F.conv2d(h, P["conv2d4.weight"], P["conv2d4.bias"], padding=1), "batchnorm5"))
    r = bn(F.conv2d(r, P["conv2d7.weight"], P["conv2d7.bias"], stride=2, padding=1), "batchnorm8")
    h = r + F.conv2d(h, P["residual3.weight"], P["residual3.bias"], stride=2)      # the 1x1 projection
    h = F.max_pool2d(F.silu(h), 2)
    h = F.layer_norm(h, (16, 2, 2), P["layernorm11.weight"], P["layernorm11.bias"], eps=1e-5)
    if training:
        h = h * mask
    return F.linear(h.flatten(1), P["dense14.weight"], P["dense14.bias"])


def test_residual_cnn_matches_torch():
    spec = spec_of(CNN[0], *CNN[1])
    assert spec.units[3].projection == "conv" and spec.units[3].proj_stride == 2
    seed, B, p = 7, 6, 0.25
    model = Model(spec, loss="softmax_ce", dtype="float32", seed=seed)
    rng = np.random.default_rng(40)
    for key in model.flat.keys():   # biases and norm parameters off their 0/1 start, so every term counts
        if key.endswith(".bias") or key.split(".")[0].startswith(("batchnorm", "layernorm")):
            v = model.flat.param(key)
            v[...] = (1.0 if key.endswith(".weight") else 0.0) + 0.2 * rng.standard_normal(v.shape)
    x = rng.standard_normal((B, 3, 8, 8)).astype(np.float32) * 2 + 0.5
    labels = rng.integers(0, 10, B)
    ctx = Ctx(step=11, first_row=24)

    # torch: every tensor copied from the flat buffer (dense weight transposed to Linear's (out, in))
    P = {}
    for key in model.flat.keys():
        v = model.flat.param(key)
        P[key] = torch.tensor(v.T.copy() if key == "dense14.weight" else v.copy(), requires_grad=True)
    running = {k: torch.tensor(model.buffers.param(k), dtype=torch.float32) for k in model.buffers.keys()}
    drop = next(u for u in spec.walk() if u.type == "dropout")
    assert drop.name == "dropout12" and model.by_name["dropout12"].seed == seed
    mask = dropout_mask((B, 16, 2, 2), p, seed, ctx.step, drop.index, ctx.first_row).astype(np.float32) / (1 - p)
    assert 0 < mask.astype(bool).mean() < 1

    loss_sum = model.loss_and_grad(x, labels, B, ctx=ctx)
    out = torch_cnn(P, torch.tensor(x), running, True, torch.tensor(mask))
    loss_t = F.cross_entropy(out, torch.tensor(labels))
    loss_t.backward()
    np.testing.assert_allclose(loss_sum, loss_t.item() * B, rtol=1e-5)
    for key in model.flat.keys():
        g = P[key].grad.T if key == "dense14.weight" else P[key].grad
        if key in BIAS_INTO_BN:   # a bias right before a batch norm: its gradient is 0, both sides rounding
            scale = np.abs(P[key.replace("bias", "weight")].grad.numpy()).max()
            assert np.abs(model.flat.grad_of(key)).max() < 1e-5 * scale
            assert np.abs(g.numpy()).max() < 1e-5 * scale
            continue
        close(model.flat.grad_of(key), g)
    for key in model.buffers.keys():   # float64 here, float32 in torch
        ref = running[key].numpy()
        np.testing.assert_allclose(model.buffers.param(key), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert not np.allclose(model.buffers.param("batchnorm8.running_var"), 1)

    # evaluation: the running statistics, no dropout
    with torch.no_grad():
        out_e = torch_cnn(P, torch.tensor(x), running, False)
        loss_e = F.cross_entropy(out_e, torch.tensor(labels), reduction="sum").item()
    before = model.buffers.data.copy()
    close(model.forward(x, ctx=EVAL)[-1], out_e)
    ev_loss, ev_correct = model.evaluate(x, labels)
    np.testing.assert_allclose(ev_loss, loss_e, rtol=1e-5)
    assert ev_correct == int((out_e.argmax(1).numpy() == labels).sum())
    np.testing.assert_array_equal(model.buffers.data, before)    # evaluation leaves the statistics alone


# ================================================================ (e) a pipeline cut and a dp split equal the whole

def grads_by_key(stage: Stage) -> dict[str, np.ndarray]:
    return {k: stage.flat.grad_of(k).copy() for k in stage.flat.keys()}


@pytest.mark.parametrize("cut", [1, 3, 4, 8])
def test_pipeline_cut_equals_the_whole(cut):
    """Stage [0, cut) then Stage [cut, n), chained by hand, give the whole Model's parameters at init, its
    loss, its gradients and its running statistics (float64; the same operations, so to rounding)."""
    spec = spec_of(CNN[0], *CNN[1])
    n, seed, B = len(spec.units), 2, 4
    whole = Model(spec, dtype="float64", seed=seed)
    first = Stage(spec, 0, cut, dtype="float64", seed=seed)
    second = Stage(spec, cut, n, dtype="float64", seed=seed)
    assert set(first.flat.keys()) | set(second.flat.keys()) == set(whole.flat.keys())
    for st in (first, second):
        for k in st.flat.keys():
            np.testing.assert_array_equal(st.flat.param(k), whole.flat.param(k))
    rng = np.random.default_rng(50)
    x, labels = rng.standard_normal((B, 3 * 8 * 8)), rng.integers(0, 10, B)
    ctx = Ctx(step=3, first_row=8)
    loss = whole.loss_and_grad(x, labels, B, ctx=ctx)

    a = first.forward(x, ctx=ctx)
    assert a[-1].shape == (B, *spec.units[cut - 1].out_shape)
    b = second.forward(a[-1], ctx=ctx)
    dout = np.empty_like(b[-1])
    loss2 = second.loss(b[-1], labels, B, dout)
    dx = second.backward(b, dout, need_dx=True, ctx=ctx)
    assert dx.shape == a[-1].shape
    assert first.backward(a, dx, need_dx=False, ctx=ctx) is None
    np.testing.assert_allclose(loss2, loss, rtol=1e-12)
    g = grads_by_key(whole)
    for st in (first, second):
        for k, v in grads_by_key(st).items():
            np.testing.assert_allclose(v, g[k], rtol=1e-12, atol=1e-14 * np.abs(g[k]).max())
        for k in st.buffers.keys():
            np.testing.assert_allclose(st.buffers.param(k), whole.buffers.param(k), rtol=1e-12)
    assert np.abs(whole.flat.grad).max() > 1e-3


class ThreadAllreduce:
    """An in-place sum over `n` threads standing in for ranks (parts added in rank order)."""

    def __init__(self, n):
        self.parts = [None] * n
        self.barrier = threading.Barrier(n)
        self.calls = 0

    def for_rank(self, rank):
        def allreduce_sum(a):
            self.parts[rank] = a.copy()
            self.barrier.wait()
            total = self.parts[0].copy()
            for p in self.parts[1:]:
                total += p
            if rank == 0:
                self.calls += 1
            self.barrier.wait()
            a[...] = total
        return allreduce_sum


DP_NET = ([2, 6, 6], [
    '{type="conv2d",channels=4,kernel=3,padding=1}',
    '{type="batchnorm"}',
    '{type="activation",function="gelu"}',
    '{type="residual",layers=[{type="conv2d",channels=6,kernel=3,padding=1,stride=2},{type="batchnorm"},'
    '{type="activation",function="silu"}]}',
    '{type="dropout",p=0.5}',
    '{type="global_avgpool"}',
    '{type="batchnorm"}',
    '{type="dense",units=3}',
])


def dp_split(spec, x, labels, first_rows, ctx_step, seed):
    """Two Models on two threads, halves of the batch, batch statistics summed by a thread allreduce."""
    B = len(x)
    comm = ThreadAllreduce(2)
    ranks = [Model(spec, dtype="float64", seed=seed) for _ in range(2)]
    halves = (slice(0, B // 2), slice(B // 2, B))
    losses, errors = [0.0, 0.0], []

    def run(r):
        try:
            ctx = Ctx(dp_sum=comm.for_rank(r), step=ctx_step, first_row=first_rows[r])
            losses[r] = ranks[r].loss_and_grad(x[halves[r]], labels[halves[r]], B, ctx=ctx)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return ranks, losses, comm.calls


def test_batchnorm_dp_sum_over_two_threads_equals_one_model():
    spec = spec_of(DP_NET[0], *DP_NET[1])
    seed, B, step, base = 6, 8, 4, 16
    rng = np.random.default_rng(60)
    x, labels = rng.standard_normal((B, 2 * 6 * 6)) + 0.3, rng.integers(0, 3, B)
    whole = Model(spec, dtype="float64", seed=seed)
    loss = whole.loss_and_grad(x, labels, B, ctx=Ctx(step=step, first_row=base))

    ranks, losses, calls = dp_split(spec, x, labels, (base, base + B // 2), step, seed)
    assert calls == 2 * 3   # three batch norms: one sum forward and one backward each
    np.testing.assert_allclose(sum(losses), loss, rtol=1e-10)
    # float64; only the order of two partial sums differs
    np.testing.assert_allclose(ranks[0].flat.grad + ranks[1].flat.grad, whole.flat.grad, rtol=1e-10,
                               atol=1e-10 * np.abs(whole.flat.grad).max())
    for r in ranks:
        np.testing.assert_allclose(r.buffers.data, whole.buffers.data, rtol=1e-10)
        np.testing.assert_array_equal(r.flat.data, whole.flat.data)

    # not vacuous: keying both halves' dropout from row 0 (not their global rows) changes the gradients
    wrong, _, _ = dp_split(spec, x, labels, (base, base), step, seed)
    assert not np.allclose(wrong[0].flat.grad + wrong[1].flat.grad, whole.flat.grad, rtol=1e-6)
    # ... and so does normalising each half alone (no dp_sum)
    alone = [Model(spec, dtype="float64", seed=seed) for _ in range(2)]
    for r, h in enumerate((slice(0, B // 2), slice(B // 2, B))):
        alone[r].loss_and_grad(x[h], labels[h], B, ctx=Ctx(step=step, first_row=base + r * B // 2))
    assert not np.allclose(alone[0].flat.grad + alone[1].flat.grad, whole.flat.grad, rtol=1e-6)
