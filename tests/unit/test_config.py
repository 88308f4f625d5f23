"""The job config: types, ranges, overrides, round trip."""
import pytest

from hpcopt import config
from hpcopt.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return str(p)


def test_defaults_and_file_values(tmp_path):
    cfg = config.load(write(tmp_path, '[optimizer]\nname = "sgd"\nlr = 1\n[model]\nlayers = [4, 3]\n'))
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.layers == [4, 3]
    assert cfg.parallel.dp == "auto" and cfg.data.batch_size == 64


def test_overrides_parse_toml_values_and_bare_words(tmp_path):
    cfg = config.load(write(tmp_path, ""), ["optimizer.name=momentum", "optimizer.lr=0.5",
                                             "model.layers=[2, 8, 3]", "parallel.overlap=false",
                                             "data.batch_size=all", "run.out_dir=runs/x"])
    assert cfg.optimizer.name == "momentum" and cfg.optimizer.lr == 0.5
    assert cfg.model.layers == [2, 8, 3] and cfg.parallel.overlap is False
    assert cfg.data.batch_size == "all" and cfg.run.out_dir == "runs/x"


def test_error_names_file_and_key(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = -1\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == f"{path}: optimizer.lr must be > 0 (got -1.0)"
    with pytest.raises(ConfigError, match=r"^command line: optimizer.lr must be > 0"):
        config.load(None, ["optimizer.lr=-2"])


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, '[optimizer]\nname = "adamw"\nbetas = [0.8, 0.95]\n'),
                      ["schedule.name=cosine", "parallel.dp=2"])
    again = config.from_toml_text(config.to_toml(cfg), "ckpt")
    assert config.as_dict(again) == config.as_dict(cfg)


def test_slurm_job_id_names_default_run_dir():
    cfg = config.load(None, ["run.name=abc"])
    assert config.resolve_out_dir(cfg, {}) == "runs/abc"
    assert config.resolve_out_dir(cfg, {"SLURM_JOB_ID": "77"}) == "runs/abc-77"
    cfg.run.out_dir = "elsewhere"
    assert config.resolve_out_dir(cfg, {"SLURM_JOB_ID": "77"}) == "elsewhere"


def test_docs_config_reference_is_current():
    """docs/config.md lists every key as the code has it (regenerate: python -m hpcopt.config)."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "config.md")
    assert open(path).read() == config.reference_markdown()
