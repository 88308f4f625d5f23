"""One training step in one process, vs PyTorch CPU: the MLP 784-1024-1024-10 (batch 256, Adam), or
with `--model cnn` a residual CNN on 16x32x32 inputs (batch 64, Adam; CNN below).

Both sides run forward, backward and the optimizer update on the same in-memory batch, with the same
thread count; PyTorch uses `torch.optim.Adam(fused=True)`. Reported: samples/s (median over repeats)
and the ratio hpcopt / PyTorch (target >= 1.0). The convolution kernels alone: `hpcopt bench conv`.
"""
from __future__ import annotations

import statistics
import time

import numpy as np


def torch_mlp(torch, widths: list[int]):
    """The peer's model: Linear layers of `widths` with ReLU between them, as hpcopt's MLP."""
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


# The benchmark CNN (model.input, model.layer): conv -> BN -> ReLU, a residual block of two such
# convolutions (ReLU after the sum), global average pooling, a dense classifier; batch norm in
# training mode on both sides. hpcopt's BN and residual ReLUs are fused into their layers' passes.
CNN_INPUT = "[16, 32, 32]"
CNN = ('[{type="conv2d", channels=16, kernel=3, padding=1}, {type="batchnorm", activation="relu"},'
       ' {type="residual", activation="relu", layers=[{type="conv2d", channels=16, kernel=3, padding=1},'
       ' {type="batchnorm", activation="relu"}, {type="conv2d", channels=16, kernel=3, padding=1},'
       ' {type="batchnorm"}]}, {type="global_avgpool"}, {type="dense", units=10}]')


def torch_cnn(torch):
    """The peer of CNN, module for module."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))

        def forward(self, x):
            return self.body(x) + x

    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Block(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def add_arguments(p) -> None:
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: the MLP of --layers; cnn: a residual CNN on 16x32x32 inputs (batch 64 unless --batch)")
    p.add_argument("--layers", default="784,1024,1024,10", help="MLP widths (default 784,1024,1024,10)")
    p.add_argument("--batch", type=int, default=0, help="default 256 (mlp), 64 (cnn)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)


def _time_steps(step, steps: int, repeats: int) -> list[float]:
    step()
    step()  # warm-up: kernels compiled, buffers touched
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    return times


def hpcopt_step(widths, batch, x, y):
    """widths: MLP widths, or "cnn"."""
    from .. import config, modelspec
    from ..config import OptimizerConfig
    from ..nn import MLP, Model
    from ..parallel.update import Update

    if widths == "cnn":
        cfg = config.load(None, [f"model.input={CNN_INPUT}", f"model.layer={CNN}"])
        model = Model(modelspec.from_config(cfg.model, "bench"))
    else:
        model = MLP(widths, "relu", "softmax_ce", "float32", seed=0)
    f = model.flat
    update = Update(OptimizerConfig(name="adam", lr=1e-3), f.data, f.grad, f.segments())
    t = [0]

    def step():
        model.loss_and_grad(x, y, batch)
        t[0] += 1
        update.apply(t[0], 1e-3)  # the trainer's path: norm / non-finite pass, then the Adam kernel

    return step


def torch_step(widths, batch, x, y, threads):
    import torch

    torch.set_num_threads(threads)
    model = torch_cnn(torch) if widths == "cnn" else torch_mlp(torch, widths)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(xt), yt).backward()
        opt.step()

    return step


def run(args) -> list[dict]:
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(0)
    if args.model == "cnn":
        widths, batch = "cnn", args.batch or 64
        x = rng.standard_normal((batch, 16, 32, 32), dtype=np.float32)
        y = rng.integers(0, 10, batch)
        name = f"train step residual CNN 16x32x32 batch {batch} adam"
    else:
        widths, batch = [int(w) for w in args.layers.split(",")], args.batch or 256
        x = rng.random((batch, widths[0]), dtype=np.float32)
        y = rng.integers(0, widths[-1], batch)
        name = f"train step MLP {args.layers} batch {batch} adam"
    args.batch = batch
    ours = statistics.median(_time_steps(hpcopt_step(widths, args.batch, x, y), args.steps, args.repeats))
    row = dict(name=name, unit="samples/s",
               hpcopt=args.batch / ours, peer_name="torch (PyTorch CPU, Adam fused)", peer=None, ratio=None,
               limit=None, threads=args.threads, hpcopt_ms=1e3 * ours)
    try:
        import torch
    except ImportError:
        row["peer_name"] = "torch not installed (pip install 'hpcopt[dev]')"
        return [row]
    theirs = statistics.median(_time_steps(torch_step(widths, args.batch, x, y, args.threads),
                                           args.steps, args.repeats))
    row.update(peer_name=f"torch {torch.__version__} Adam(fused=True)", peer=args.batch / theirs,
               ratio=theirs / ours, peer_ms=1e3 * theirs)
    return [row]
