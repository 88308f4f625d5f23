"""Sweep files: what is read, and every mistake refused with one line (exit 2) before any trial starts.
The sweep's own search logic (grid order, counter-based random values, PBT's exploit plan) is checked
here without MPI; tests/mpi/test_sweep.py runs sweeps."""
from __future__ import annotations

import os
import sys

import pytest

from hpcopt import cli
from hpcopt.errors import ConfigError
from hpcopt.sweep import spec as sweep_spec
from hpcopt.sweep.pbt import exploit_plan
from hpcopt.sweep.search import Search, random_values

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")

GOOD_SPACE = '''[space]
"optimizer.name" = ["sgd", "momentum", "adam"]
"optimizer.lr" = { log_uniform = [1e-4, 1e-1] }
"data.batch_size" = [32, 64, 128]
'''


def write(tmp_path, sweep: str, space: str = GOOD_SPACE, job: str = JOB) -> str:
    p = tmp_path / "s.toml"
    p.write_text(f'job = "{job}"\n[sweep]\n{sweep}\n{space}')
    return str(p)


def test_a_good_file_is_read(tmp_path):
    s = sweep_spec.load(write(tmp_path, 'method = "random"\ntrials = 5\nranks_per_trial = 2\nbudget_steps = 100'),
                        world_size=4)
    assert (s.method, s.trials, s.ranks_per_trial, s.metric, s.direction) == ("random", 5, 2, "test_acc", "max")
    assert s.keys == ["optimizer.name", "optimizer.lr", "data.batch_size"]
    cfg = s.trial_config({"optimizer.name": "sgd", "optimizer.lr": 0.01, "data.batch_size": 32}, "runs/x/trial_0001")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.data.batch_size, cfg.run.steps, cfg.run.out_dir) == (
        "sgd", 0.01, 32, 100, "runs/x/trial_0001")
    assert cfg.model.layers == [64, 128, 128, 10]   # the base job's


def test_grid_is_the_product_last_key_fastest(tmp_path):
    s = sweep_spec.load(write(tmp_path, 'method = "grid"', '[space]\n"optimizer.name" = ["sgd", "adam"]\n'
                              '"optimizer.lr" = { log_uniform = [1e-3, 1e-1], grid = 3 }\n'))
    assert s.trials == 6
    assert s.grid() == [{"optimizer.name": n, "optimizer.lr": lr} for n in ("sgd", "adam") for lr in (0.001, 0.01, 0.1)]


def test_random_values_are_a_function_of_seed_and_trial(tmp_path):
    s = sweep_spec.load(write(tmp_path, 'method = "random"\ntrials = 8'))
    a = [random_values(s, t) for t in range(8)]
    assert a == [random_values(s, t) for t in range(8)]
    assert len({repr(v) for v in a}) == 8
    assert all(1e-4 <= v["optimizer.lr"] <= 1e-1 and v["data.batch_size"] in (32, 64, 128) for v in a)
    # asked in any order (groups finishing early), trial k has the same values
    search = Search(s, {})
    asked = [search.ask() for _ in range(8)]
    assert [v for _, v, _ in asked] == a and search.ask() is None


def test_resume_hands_out_interrupted_trials_first_and_continues(tmp_path):
    s = sweep_spec.load(write(tmp_path, 'method = "random"\ntrials = 5'))
    history = {0: dict(trial=0, status="done", values=random_values(s, 0), metric=0.9),
               1: dict(trial=1, status="running", values=random_values(s, 1)),
               2: dict(trial=2, status="failed", values=random_values(s, 2))}
    search = Search(s, history)
    assert search.ask() == (1, random_values(s, 1), True)
    assert [search.ask()[0] for _ in range(2)] == [3, 4]
    assert search.ask() is None


def test_tpe_resumes_from_recorded_history(tmp_path):
    pytest.importorskip("optuna")
    s = sweep_spec.load(write(tmp_path, 'method = "tpe"\ntrials = 4'))
    first = Search(s, {})
    t, v, _ = first.ask()
    first.tell(t, "done", 0.5)
    again = Search(s, {0: dict(trial=0, status="done", values=v, metric=0.5)})
    assert len(again.study.trials) == 1 and again.study.trials[0].value == 0.5
    assert again.ask()[0] == 1


def test_pbt_plan_copies_the_best_into_the_worst(tmp_path):
    s = sweep_spec.load(write(tmp_path, 'method = "pbt"\ntrials = 8\nbudget_steps = 100',
                              '[space]\n"optimizer.lr" = { log_uniform = [1e-4, 1e-1] }\n'))
    values = {m: {"optimizer.lr": 0.001 * (m + 1)} for m in range(8)}
    scores = {m: 0.5 + 0.01 * m for m in range(8)}   # member 7 is the best
    plan = exploit_plan(s, scores, values, rnd=0)
    assert sorted(d for d, _, _ in plan) == [0, 1]    # the worst quarter
    for dst, src, new in plan:
        assert src in (6, 7)
        assert any(new["optimizer.lr"] == pytest.approx(values[src]["optimizer.lr"] * f, rel=1e-5) for f in s.perturb)
    assert plan == exploit_plan(s, scores, values, rnd=0)           # the same on every rank
    scores[3] = None                                                  # a failed member ranks last
    assert 3 in [d for d, _, _ in exploit_plan(s, scores, values, rnd=1)]


BAD = [
    ('method = "random"\ntrials = 4\ncolour = 3', GOOD_SPACE, "unknown key sweep.colour"),
    ('method = "random"\ntrials = 4', "[space]\n", "[space] is empty"),
    ('method = "random"\ntrials = 4\nranks_per_trial = 2', GOOD_SPACE, "does not divide the 1 ranks"),
    ('method = "random"\ntrials = 4', '[space]\n"optimizer.lr" = ["fast"]\n', 'space "optimizer.lr" value \'fast\''),
    ('method = "random"\ntrials = 4', '[space]\n"optimizer.name" = ["adamm"]\n', 'space "optimizer.name" value'),
    ('method = "random"\ntrials = 4', '[space]\n"optimizer.speed" = [1, 2]\n', "unknown key optimizer.speed"),
    ('method = "random"\ntrials = 4', '[space]\n"optimizer.lr" = { log_uniform = [0, 1] }\n', "log_uniform needs low > 0"),
    ('method = "bayes"\ntrials = 4', GOOD_SPACE, 'sweep.method = \'bayes\' is not one of grid, random, tpe, asha, pbt'),
    ('method = "grid"', '[space]\n"optimizer.lr" = { uniform = [0.1, 0.2] }\n', "needs a finite set"),
    ('method = "random"\ntrials = "many"', GOOD_SPACE, "sweep.trials must be an integer"),
    ('method = "random"\ntrials = 4\nmetric = "speed"', GOOD_SPACE, "sweep.metric = 'speed'"),
    ('method = "pbt"\ntrials = 4\nbudget_steps = 100', GOOD_SPACE, 'cannot vary "data.batch_size"'),
]


@pytest.mark.parametrize("sweep,space,words", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_sweep_files_get_one_line_and_exit_2(tmp_path, capsys, sweep, space, words):
    path = write(tmp_path, sweep, space)
    assert cli.main(["sweep", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and path in err, err
    assert not os.path.exists(tmp_path / "runs")   # nothing started, nothing written


def test_a_missing_job_file_and_a_bad_override(tmp_path, capsys):
    assert cli.main(["sweep", write(tmp_path, 'method = "random"\ntrials = 2', job="nope.toml")]) == 2
    assert "no such job file" in capsys.readouterr().err
    assert cli.main(["sweep", write(tmp_path, 'method = "random"\ntrials = 2'), "optimizer.lr=-1"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err


def test_optuna_missing_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    for method in ("tpe", "asha"):
        with pytest.raises(ConfigError, match=r"needs Optuna: pip install 'hpcopt\[sweep\]'"):
            sweep_spec.load(write(tmp_path, f'method = "{method}"\ntrials = 4\nbudget_steps = 100'))
    assert cli.main(["sweep", write(tmp_path, 'method = "tpe"\ntrials = 4')]) == 2
    assert "hpcopt[sweep]" in capsys.readouterr().err
    sweep_spec.load(write(tmp_path, 'method = "random"\ntrials = 4'))   # random needs no Optuna
