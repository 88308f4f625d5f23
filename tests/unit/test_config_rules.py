"""Rules between keys (config.APPLIES_TO, NEEDS, DEVICES_OF, EXCLUDES): a key set for a strategy or
component that ignores it, a device a strategy cannot use, values that exclude each other. Each case
runs `hpcopt train` as a user would and must give ONE line naming the keys and exit 2, before any
data is read or any directory is made."""
import os

import pytest

from hpcopt import config
from tests.conftest import REPO, hpcopt

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")  # cosine schedule, adam, strategy data

CASES = [
    # the case found by hand: local SGD ran to "done" with no compression and no message
    (["parallel.strategy=local_sgd", "parallel.compression=fp16"],
     'parallel.compression = "fp16" applies to parallel.strategy = "data" only (this job\'s is "local_sgd")'),
    (["parallel.strategy=async", "parallel.compression=topk"], 'parallel.compression = "topk" applies to'),
    (["parallel.strategy=pipeline", "parallel.zero=1"], 'parallel.zero = 1 applies to parallel.strategy = "data"'),
    (["parallel.average_every=4"], 'parallel.average_every = 4 applies to parallel.strategy = "local_sgd" only'),
    (["parallel.average_optimizer_state=true"], "parallel.average_optimizer_state = true applies to"),
    (["parallel.max_staleness=2"], 'parallel.max_staleness = 2 applies to parallel.strategy = "async" only'),
    (["parallel.micro_batches=4"], 'parallel.micro_batches = 4 applies to parallel.strategy = "pipeline"'),
    (["parallel.strategy=tensor", "parallel.schedule=gpipe"], 'parallel.schedule = "gpipe" applies to'),
    (["parallel.balance=flops"], 'parallel.balance = "flops" applies to'),
    (["parallel.stage_layers=[1, 2]"], "parallel.stage_layers = [1, 2] applies to"),
    (["parallel.strategy=local_sgd", "parallel.bucket_mb=1"], "parallel.bucket_mb = 1.0 applies to"),
    (["parallel.strategy=async", "parallel.overlap=false"], "parallel.overlap = false applies to"),
    (["parallel.topk_density=0.05"], 'parallel.topk_density applies only when parallel.compression = "topk"'),
    (["schedule.name=constant", "schedule.min_lr=0.001"],
     'schedule.min_lr applies only when schedule.name = "cosine" / "linear" (this job\'s is "constant")'),
    (["schedule.step_size=10"], 'schedule.step_size applies only when schedule.name = "step"'),
    (["schedule.gamma=0.5"], 'schedule.gamma applies only when schedule.name = "step" / "exponential"'),
    (["schedule.name=step", "schedule.total_steps=100"], "schedule.total_steps applies only when"),
    (["schedule.base_batch_size=256"], "schedule.base_batch_size applies only when schedule.scale_lr_with_batch"),
    (["optimizer.nesterov=true"], 'optimizer.nesterov applies only when optimizer.name = "sgd"'),
    (["parallel.strategy=local_sgd", "backend.device=cuda"],
     'parallel.strategy = "local_sgd" runs the optimizer on cpu only: backend.device = "cuda"'),
    (["parallel.strategy=async", "backend.device=cuda"], 'parallel.strategy = "async" runs the optimizer on cpu'),
    (["parallel.zero=1", "backend.device=cuda"], "parallel.zero = 1 runs the optimizer on the host"),
    (["parallel.zero=1", "parallel.compression=bf16"], 'is not available with parallel.compression = "bf16"'),
    (["parallel.zero=1", "optimizer.name=lamb"], "needs whole-layer norms"),
    (["parallel.compression=fp16", "model.dtype=float64"], 'needs model.dtype = "float32"'),
    (["parallel.strategy=async", "optimizer.on_nonfinite=stop"], "drops non-finite gradients on the server"),
    (["optimizer.betas=[0.9, 0.99, 0.5]"], "optimizer.betas needs exactly 2 entries"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cross_key_rule_is_one_line_exit_2(tmp_path, overrides, message):
    out = tmp_path / "run"
    p = hpcopt("train", JOB, f"run.out_dir={out}", "data.path=does-not-matter.h5", *overrides, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert lines[0].startswith("hpcopt: command line:") or lines[0].startswith(f"hpcopt: {JOB}:"), lines[0]
    assert not out.exists()  # refused before anything was made


def test_at_least_15_rules_are_exercised():
    assert len(CASES) >= 15


@pytest.mark.parametrize("overrides", [
    ["parallel.strategy=local_sgd", "parallel.compression=none"],   # a key AT its default is never an error
    ["parallel.strategy=local_sgd", "parallel.average_every=4", "parallel.average_optimizer_state=true"],
    ["parallel.strategy=async", "parallel.max_staleness=0"],
    ["parallel.compression=topk", "parallel.topk_density=0.05"],
    ["schedule.name=step", "schedule.step_size=10", "schedule.gamma=0.5"],
    ["schedule.scale_lr_with_batch=true", "schedule.base_batch_size=256"],
    ["parallel.strategy=hybrid", "parallel.micro_batches=4", "parallel.schedule=gpipe", "parallel.bucket_mb=1"],
    ["optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.momentum=0.9"],
])
def test_keys_for_their_own_strategy_load(overrides):
    config.load(JOB, overrides)


def test_rule_tables_name_real_keys_and_values():
    keys = {f"{s}.{k}" for s, d in config.as_dict(config.JobConfig()).items() for k in d}
    for key, strategies in config.APPLIES_TO.items():
        assert key in keys and set(strategies) <= set(config.STRATEGIES), key
    for key, (other, _) in config.NEEDS.items():
        assert key in keys and other in keys, key
    assert set(config.DEVICES_OF) == set(config.STRATEGIES)
    for a, _, b, _, _ in config.EXCLUDES:
        assert a in keys and b in keys, (a, b)


def test_every_key_has_a_description():
    import dataclasses

    for section in config.SECTIONS:
        for f in dataclasses.fields(type(config.JobConfig().section(section))):
            assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"


def test_stored_config_of_an_older_version_still_parses():
    """A checkpoint's config is read without the cross-key rules: an older, looser version may have
    stored a combination that is refused now (e.g. local_sgd with compression, silently ignored then)."""
    cfg = config.load(JOB, [])
    cfg.parallel.strategy, cfg.parallel.compression = "local_sgd", "fp16"
    text = config.to_toml(cfg)
    assert config.from_toml_text(text, "old.h5").parallel.compression == "fp16"
