"""Layer lists under the parallel layouts, without MPI (constructors do not communicate): tensor
parallelism refuses what it cannot split in one line, pipeline stages cut a layer list at its
top-level layers (a residual block is one) balanced by parameters or FLOPs, the stage buffers take
the cut's shapes, and the memory check counts a layer list's parameters."""
import numpy as np
import pytest
from mpi4py import MPI

from hpcopt import config, modelspec
from hpcopt.comm import Grid
from hpcopt.errors import ConfigError
from hpcopt.parallel import build, check_memory
from hpcopt.parallel.pipeline import layer_costs

CNN = ["model.input=[1, 8, 8]",
       'model.layer=[{type="conv2d", channels=8, kernel=3, padding=1, activation="relu"},'
       ' {type="residual", layers=[{type="conv2d", channels=8, kernel=3, padding=1}, {type="batchnorm"}]},'
       ' {type="maxpool2d", kernel=2}, {type="flatten"}, {type="dense", units=32, activation="gelu"},'
       ' {type="dense", units=10}]']


def fake_grid(dp=1, pp=1, tp=1, pp_rank=0):
    c = MPI.COMM_SELF
    return Grid(c, dp, pp, tp, 0, pp_rank, 0, c, c, c)


def test_tensor_parallel_refuses_a_layer_it_cannot_split():
    cfg = config.load(None, CNN + ["parallel.strategy=tensor", "parallel.tp=2"])
    with pytest.raises(ConfigError) as e:
        build(cfg, fake_grid(tp=2), 64)
    msg = str(e.value)
    assert "parallel.tp = 2 splits pairs of dense layers only" in msg and "conv2d0 (conv2d)" in msg
    assert "\n" not in msg


def test_tensor_parallel_takes_a_dense_only_layer_list():
    cfg = config.load(None, ["model.input=[64]", 'model.layer=[{type="dense", units=32, activation="relu"},'
                             ' {type="dense", units=10}]', "parallel.strategy=tensor", "parallel.tp=2"])
    s = build(cfg, fake_grid(tp=2), 64)
    assert s.stage.layers[0].W.shape == (64, 16) and s.stage.layers[1].W.shape == (16, 10)


def test_pipeline_cuts_a_layer_list_at_top_level_layers():
    spec = modelspec.from_config(config.load(None, CNN).model, "x")
    assert len(spec.units) == 6  # the residual block (with its 2 layers) is one unit
    params, flops = layer_costs(spec, "params"), layer_costs(spec, "flops")
    assert params == [80, 8 * 8 * 9 + 8 + 16, 0, 0, 128 * 32 + 32, 32 * 10 + 10]
    assert flops[0] > 6 * 72 * 64 and flops[2] > 0   # conv: 6 per weight use, 64 pixels; pooling costs too
    # by parameters the dense layers weigh most; by FLOPs the convolutions (64 pixels each): the
    # cut leaves the two convolutional units alone on stage 0 and keeps the largest stage smallest
    for balance, costs in (("params", params), ("flops", flops)):
        cfg = config.load(None, CNN + ["parallel.strategy=pipeline", "parallel.pp=2", f"parallel.balance={balance}"])
        bounds = build(cfg, fake_grid(pp=2), 64).partition.bounds
        worst = max(sum(costs[lo:hi]) for lo, hi in bounds)
        assert worst == min(max(sum(costs[:k]), sum(costs[k:])) for k in range(1, 6)), balance
    assert sum(flops[:2]) > sum(flops[2:]) and sum(params[:2]) < sum(params[2:])
    cfg = config.load(None, CNN + ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.stage_layers=[3, 3]",
                                   "parallel.micro_batches=2"])
    first, second = build(cfg, fake_grid(pp=2), 64), build(cfg, fake_grid(pp=2, pp_rank=1), 64)
    assert [layer.name for layer in first.stage.layers] == ["conv2d0", "residual1", "maxpool2d4"]
    assert first.stage.out_shape == (8, 4, 4) == second.stage.in_shape
    assert second.executor.inputs[0].shape == (32, 8, 4, 4) and second.executor.dxs[0].shape == (32, 8, 4, 4)
    assert first.stage.buffers.keys() == ["batchnorm3.running_mean", "batchnorm3.running_var"]
    assert second.stage.buffers.size == 0 and not second.buffer_blocks
    with pytest.raises(ConfigError, match="parallel.pp = 7 stages but model.layer has only 6 layers"):
        build(config.load(None, CNN + ["parallel.strategy=pipeline", "parallel.pp=7"]), fake_grid(pp=7), 64)


def test_memory_check_counts_a_layer_list():
    cfg = config.load(None, CNN)
    n = modelspec.from_config(cfg.model, "x").n_params()
    assert n == sum(layer_costs(modelspec.from_config(cfg.model, "x"), "params"))
    check_memory(cfg, fake_grid(), available=10**9)
    with pytest.raises(ConfigError, match=f"{n:,} parameters"):
        check_memory(cfg, fake_grid(), available=1000)


def test_stored_config_keeps_only_the_model_form_in_use():
    cfg = config.load(None, CNN)
    text = config.to_toml(cfg)
    assert "layer = [" in text and "\nlayers = " not in text and "\nactivation = " not in text
    again = config.from_toml_text(text, "stored")
    assert modelspec.from_config(again.model, "a").describe() == modelspec.from_config(cfg.model, "b").describe()
    mlp = config.to_toml(config.load(None, []))
    assert "layers = [64, 128, 10]" in mlp and "input" not in mlp and "layer = " not in mlp
    np.testing.assert_equal(len(modelspec.tensors(modelspec.from_config(cfg.model, "x"))), 10)
