"""names.py is the one list of every name a job may use; each registry must agree with it."""
import numpy as np
import pytest
from mpi4py import MPI

from hpcopt import config, names, optim, parallel
from hpcopt.kernels import cpu as K
from hpcopt.nn.losses import LOSSES
from hpcopt.optim.base import kernels
from hpcopt.optim.schedules import lr_at
from hpcopt.parallel import compress, schedule


def test_optimizer_registry_is_the_names_table():
    assert list(optim.REGISTRY) == list(names.OPTIMIZERS) == list(config.OPTIMIZERS)
    assert set(optim.DEFAULTS) == set(optim.STATE_NAMES) == set(names.OPTIMIZERS)


def test_strategies_codecs_and_schedules_are_the_names_tables():
    assert set(parallel.COMPOSE) == set(names.STRATEGIES) == set(config.STRATEGIES)
    assert tuple(schedule.SCHEDULES) == names.PIPELINE_SCHEDULES
    for codec in names.CODECS:
        assert compress.build(codec, MPI.COMM_SELF, [8]).name == codec


@pytest.mark.parametrize("name", names.LR_SCHEDULES)
def test_every_lr_schedule_name_is_implemented(name):
    cfg = config.ScheduleConfig(name=name)
    assert lr_at(3, 0.1, cfg, 100) > 0


def test_model_names_and_devices_are_implemented():
    assert set(names.ACTIVATIONS) <= set(K.ACTIVATIONS)
    assert set(names.LOSSES) == set(LOSSES)
    assert kernels("cpu").__name__.endswith("optim_cpu")
    from hpcopt.nn.layers import Dense

    for init in names.INITS:
        from hpcopt.nn.params import FlatParams

        d = Dense("dense0", 3, 2)
        f = FlatParams(d.param_specs(), np.float32)
        d.bind(f)
        d.init(np.random.default_rng(0), init)
        assert np.abs(f.data).sum() > 0
