"""Pipeline, tensor and hybrid parallel under mpirun (2 or 4 ranks, oversubscribed on small machines):
every layout trains the same parameters as the unsplit model on one rank, 1F1B holds fewer activations
than GPipe, checkpoints reshard between layouts, and config mistakes are one line and exit 2."""
import json
import os
import shutil

import numpy as np
import pytest

from hpcopt import checkpoint
from tests.conftest import REPO, ckpt_export, hpcopt

pytestmark = pytest.mark.mpi
JOB = os.path.join(REPO, "jobs/digits_mlp.toml")
# Deep enough for 4 stages; momentum SGD at a constant lr, so parameters move every step.
MODEL = ["model.layers=[64, 64, 64, 64, 10]", "data.batch_size=64", "optimizer.name=momentum",
         "optimizer.lr=0.05", "optimizer.momentum=0.9", "schedule.name=constant", "schedule.warmup_steps=0"]


def train(digits, out, n, layout=(), steps=50, extra=(), resume=False):
    args = ["train", JOB, f"data.path={digits}", f"run.out_dir={out}", f"run.steps={steps}", "run.log_every=10",
            "--quiet", *MODEL, *layout, *extra] + (["--resume", "auto"] if resume else [])
    return hpcopt(*args, n=n if n > 1 else None, timeout=240, check=True)


def export(out, step=50):
    return ckpt_export(out / "checkpoints" / checkpoint.file_name(step), out / f"params_{step}.npz")


def final_metrics(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r][-1]


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("unsplit") / "run"
    train(digits, out, 1)
    return out


LAYOUTS = {
    "pp2-gpipe": (2, ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=4",
                      "parallel.schedule=gpipe"]),
    "pp2-1f1b": (2, ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=4",
                     "parallel.schedule=1f1b"]),
    "pp4-gpipe": (4, ["parallel.strategy=pipeline", "parallel.pp=4", "parallel.micro_batches=4",
                      "parallel.schedule=gpipe"]),
    "pp4-1f1b": (4, ["parallel.strategy=pipeline", "parallel.pp=4", "parallel.micro_batches=4",
                     "parallel.schedule=1f1b"]),
    "tp2": (2, ["parallel.strategy=tensor", "parallel.tp=2"]),
    "dp2-pp2": (4, ["parallel.strategy=pipeline", "parallel.dp=2", "parallel.pp=2", "parallel.micro_batches=4"]),
    # one bucket per layer: the dp exchange starts during the last micro-batch's backward (overlap)
    "dp2-pp2-buckets": (4, ["parallel.strategy=pipeline", "parallel.dp=2", "parallel.pp=2",
                            "parallel.micro_batches=4", "parallel.bucket_mb=0.001", "parallel.overlap=true"]),
    "dp2-tp2-buckets": (4, ["parallel.strategy=tensor", "parallel.dp=2", "parallel.tp=2",
                            "parallel.micro_batches=2", "parallel.bucket_mb=0.001", "parallel.overlap=true"]),
    # a stage cut between the two halves of a tensor-parallel pair: dense0 (column) | dense1 (row) ...
    "pp2-tp2-cut-in-pair": (4, ["parallel.strategy=hybrid", "parallel.pp=2", "parallel.tp=2",
                                "parallel.micro_batches=2", "parallel.stage_layers=[1, 3]"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_the_same_parameters_as_one_process(tmp_path, digits, unsplit, layout):
    n, args = LAYOUTS[layout]
    out = tmp_path / layout
    train(digits, out, n, args)
    ref, got = export(unsplit), export(out)
    assert got.keys() == ref.keys()
    for k in ref:
        # The same global batch summed in another order (micro-batches accumulated, partial products
        # summed over tp): float32 rounding only, which 50 steps keep well inside rtol 1e-5.
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{k}, {layout}")
    a, b = final_metrics(unsplit), final_metrics(out)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # loss reaches rank 0 from the last stage
    assert b["test_acc"] == a["test_acc"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert tuple(checkpoint.read(str(out / "checkpoints/step_00000050.h5")).attrs["world"]) != (1, 1, 1)


@pytest.mark.slow
def test_global_norm_clipping_counts_every_tensor_once(tmp_path, digits):
    """clip_norm and clip_value active every step, on dp × pp × tp = 1 × 2 × 2 with an odd last layer (its
    tensors and the row biases are on both tp ranks) vs one process."""
    clip = ["optimizer.clip_norm=0.3", "optimizer.clip_value=0.02", "model.layers=[64, 64, 64, 10]"]
    ref, out = tmp_path / "ref", tmp_path / "hybrid"
    train(digits, ref, 1, extra=clip, steps=30)
    train(digits, out, 4, ["parallel.strategy=hybrid", "parallel.pp=2", "parallel.tp=2",
                           "parallel.micro_batches=2"], extra=clip, steps=30)
    a, b = export(ref, 30), export(out, 30)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    na, nb = final_metrics(ref)["grad_norm"], final_metrics(out)["grad_norm"]
    assert na > 0.3 and nb == pytest.approx(na, rel=1e-5)  # clipping was active; norm counted once


def bench_rows(P, M):
    p = hpcopt("bench", "pipeline", "--json", "--pp", str(P), "--micro-batches", str(M), "--width", "32",
               "--rows", "4", "--steps", "1", "--repeats", "1", timeout=120, check=True)
    return {r["name"]: r for r in map(json.loads, p.stdout.splitlines()) if r["name"].startswith("bubble")}


def test_1f1b_holds_P_micro_batches_of_activations_gpipe_M(tmp_path, digits):
    """Counted by the runner on every stage of a real 4-rank run (the bench reports the counts)."""
    rows = bench_rows(4, 8)
    assert rows["bubble P=4 M=8 1f1b"]["peak_activations"] == [4, 3, 2, 1]   # stage 0: P
    assert rows["bubble P=4 M=8 gpipe"]["peak_activations"] == [8, 8, 8, 8]  # every stage: M
    assert rows["bubble P=4 M=8 1f1b"]["peak_activations_stage0"] <= 4
    for schedule, peak in (("1f1b", 4), ("gpipe", 8)):  # and in training: stage 0's count reaches the metrics
        out = tmp_path / schedule
        train(digits, out, 4, ["parallel.strategy=pipeline", "parallel.pp=4", "parallel.micro_batches=8",
                               f"parallel.schedule={schedule}"], steps=10)
        assert final_metrics(out)["pipeline_peak_activations"] == peak


@pytest.mark.slow
def test_checkpoint_reshards_between_layouts(tmp_path, digits):
    """Saved by (dp=2, pp=2), resumed as (dp=4) and as (pp=4): the run continues as if unbroken."""
    straight = tmp_path / "straight"
    train(digits, straight, 4, ["parallel.strategy=pipeline", "parallel.dp=2", "parallel.pp=2",
                                "parallel.micro_batches=4"], extra=["checkpoint.every_steps=25"])
    ref = export(straight)
    for name, layout in (("dp4", ["parallel.strategy=data", "parallel.dp=4"]),
                         ("pp4", ["parallel.strategy=pipeline", "parallel.pp=4", "parallel.micro_batches=4",
                                  "parallel.schedule=gpipe"])):
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(straight / "checkpoints/step_00000025.h5", out / "checkpoints")
        p = train(digits, out, 4, layout, resume=True)
        assert "step_00000025.h5 at step 25" in p.stderr
        got = export(out)
        for k in ref:
            # other layouts sum the same global batch in another order: rounding only
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=f"{k}, {name}")
        ck = checkpoint.read(str(out / "checkpoints/step_00000050.h5"))
        a = checkpoint.read(str(straight / "checkpoints/step_00000050.h5"))
        for k in a.optim["momentum_buffer"]:  # the optimizer state came along, in the global format
            # a sum of recent gradients (~1e-2): rounding shows in its smallest elements, hence the atol
            np.testing.assert_allclose(ck.optim["momentum_buffer"][k], a.optim["momentum_buffer"][k],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,args,message", [
    (3, ["parallel.strategy=pipeline", "parallel.pp=2"], "parallel.pp * parallel.tp = 2 does not divide the 3 ranks"),
    (2, ["parallel.strategy=pipeline", "parallel.pp=2", "model.layers=[64, 10]"],
     "parallel.pp = 2 stages but model.layers has only 1 layers"),
    (2, ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=3"],
     "parallel.micro_batches = 3 does not divide the per-replica batch"),
    (2, ["parallel.strategy=tensor", "parallel.tp=2", "model.layers=[64, 63, 10]"],
     "model.layers[1] = 63 does not divide by parallel.tp = 2"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, digits, n, args, message):
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={tmp_path / 'r'}", "--quiet", *args,
               n=n, timeout=180)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("hpcopt")]  # the rest is mpirun's own notice
    assert len(lines) == 1 and message in lines[0], p.stderr


@pytest.mark.slow
def test_cuda_optimizer_on_a_hybrid_partition(tmp_path, digits):
    """backend.device = "cuda" (Numba's CUDA simulator when there is no GPU): the optimizer runs on
    device mirrors of each partition's buffers, with the global norm clip; the same as the CPU run."""
    import subprocess

    from tests.conftest import mpirun_cmd, run_env

    def go(device):
        out = tmp_path / device
        cmd = mpirun_cmd(4, ["-m", "hpcopt", "train", JOB, f"data.path={digits}", f"run.out_dir={out}",
                             "run.steps=6", "--quiet", "model.layers=[64, 8, 8, 10]", "optimizer.clip_norm=0.5",
                             "parallel.strategy=hybrid", "parallel.pp=2", "parallel.tp=2",
                             "parallel.micro_batches=2", f"backend.device={device}"],
                         export=("NUMBA_ENABLE_CUDASIM",))
        p = subprocess.run(cmd, env=dict(run_env(), NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return export(out, 6)

    cpu, gpu = go("cpu"), go("cuda")
    for k in cpu:  # the same float32 arithmetic in another kernel: rounding-level at most
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-5, atol=1e-7, err_msg=k)
