"""Every optimizer trains the digits MLP to >= 90% test accuracy on 2 ranks with its documented
defaults (the main job with its lr line removed: docs/optimizers.md, "Learns")."""
import json
import os

import pytest

from hpcopt.config import OPTIMIZERS
from tests.conftest import REPO, hpcopt

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def job_without_lr(tmp_path_factory):
    text = open(os.path.join(REPO, "jobs/digits_mlp.toml")).read()
    lines = [l for l in text.splitlines() if not l.strip().startswith("lr =")]
    path = tmp_path_factory.mktemp("job") / "digits_defaults.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_learns_digits_with_defaults(name, job_without_lr, digits, tmp_path):
    out = tmp_path / name
    hpcopt("train", job_without_lr, f"data.path={digits}", f"run.out_dir={out}", f"optimizer.name={name}",
           "--quiet", n=2, timeout=240, check=True)
    final = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "test_acc" in r][-1]
    print(f"{name}: {final['step']} steps, test accuracy {final['test_acc']:.4f}")
    assert final["test_acc"] >= 0.90, (name, final)
