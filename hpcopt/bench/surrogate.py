"""A surrogate of a simulation trained by hpcopt and by PyTorch: the same network, the same initial
weights (copied from hpcopt's flat buffer), the same batches in the same order, the same Adam and the
same number of steps, in one run; reported: the test relative L2 error of both (target: hpcopt within
5% of PyTorch's) and the training time of each.

Data: `--data FILE` (a regression file), or a Darcy flow set generated here (`hpcopt data make darcy2d`,
docs/data.md). Model: a small CNN mapping the coefficient field to the solution (SURROGATE below).
For context, the published figure on Darcy at 85x85 with 1,000 training samples: FNO relative L2
~0.011 (Li et al. 2021); a plain CNN of this size is not meant to reach it.
"""
from __future__ import annotations

import os
import time

import numpy as np

SURROGATE = ('[{type="conv2d", channels=16, kernel=3, padding=1, activation="relu"},'
             ' {type="conv2d", channels=16, kernel=3, padding=2, dilation=2, activation="relu"},'
             ' {type="conv2d", channels=16, kernel=3, padding=4, dilation=4, activation="relu"},'
             ' {type="conv2d", channels=16, kernel=3, padding=1, activation="relu"},'
             ' {type="conv2d", channels=1, kernel=3, padding=1}]')


def add_arguments(p) -> None:
    p.add_argument("--data", default="", help="a regression data file (default: generate Darcy flow here)")
    p.add_argument("--samples", type=int, default=1024, help="generated samples (train + test)")
    p.add_argument("--grid", type=int, default=32, help="generated grid size")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)


def torch_twin(torch, model):
    """The hpcopt Model's network in torch (conv2d, dense, flatten, activation units), with its weights."""
    nn = torch.nn
    acts = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "silu": nn.SiLU}
    mods = []
    for layer, unit in zip(model.layers, model.units):
        k = unit.keys
        if unit.type == "conv2d":
            c = nn.Conv2d(unit.in_shape[0], k["channels"], k["kernel"], k["stride"], k["padding"], k["dilation"])
            c.weight.data = torch.tensor(layer.W.copy())
            c.bias.data = torch.tensor(layer.b.copy())
            mods += [c, acts[k["activation"]]()]
        elif unit.type == "dense":
            d = nn.Linear(unit.in_shape[0], k["units"])
            d.weight.data = torch.tensor(layer.W.T.copy())
            d.bias.data = torch.tensor(layer.b.copy())
            mods += [d, acts[k["activation"]]()]
        elif unit.type == "flatten":
            mods.append(nn.Flatten())
        elif unit.type == "activation":
            mods.append(acts[k["function"]]())
        else:
            raise ValueError(f"bench surrogate: no torch twin for {unit.type}")
    return nn.Sequential(*mods)


def run(args) -> list[dict]:
    import torch
    from mpi4py import MPI

    from .. import config, modelspec
    from ..config import OptimizerConfig
    from ..data import ShardedLoader, inspect
    from ..nn import Model
    from ..parallel.update import Update

    torch.set_num_threads(args.threads)
    path = args.data
    if not path:
        from ..data.pde import make_pde

        path = f"bench-darcy-{args.grid}-{args.samples}.h5"
        if not os.path.exists(path):
            make_pde("darcy2d", path, args.samples, args.grid, seed=0, test_fraction=0.2, comm=MPI.COMM_SELF)
    info = inspect(path)
    cfg = config.load(None, [f"model.input={list(info.x_shape)}", f"model.layer={SURROGATE}", "model.loss=rel_l2"])
    spec = modelspec.from_config(cfg.model, "bench")
    model = Model(spec, loss="rel_l2", seed=0)
    twin = torch_twin(torch, model)
    f = model.flat
    update = Update(OptimizerConfig(name="adam", lr=args.lr), f.data, f.grad, f.segments())
    opt = torch.optim.Adam(twin.parameters(), lr=args.lr)
    loader = ShardedLoader(path, "train", args.batch, 0, 1, seed=0)
    batches = [loader.batch(s) for s in range(args.steps)]
    warm = Model(spec, loss="rel_l2", seed=1)   # compile/load every kernel outside the timed loop
    warm.loss_and_grad(*batches[0], args.batch)
    twin_warm = torch_twin(torch, warm)
    rel_l2_warm = twin_warm(torch.from_numpy(batches[0][0])).sum()
    rel_l2_warm.backward()

    t0 = time.perf_counter()
    for s, (x, y) in enumerate(batches):
        model.loss_and_grad(x, y, len(x))
        update.apply(s + 1, args.lr)
    ours_s = time.perf_counter() - t0

    def rel_l2(out, t):
        out, t = out.reshape(len(out), -1), t.reshape(len(t), -1)
        return (torch.linalg.vector_norm(out - t, dim=1) / torch.linalg.vector_norm(t, dim=1)).mean()

    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        rel_l2(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    theirs_s = time.perf_counter() - t0

    test = ShardedLoader(path, "test", 1, 0, 1, seed=0)
    xt, yt = test.slice(0, test.n)
    ours = float(model.evaluate(xt, yt)[1]) / test.n
    with torch.no_grad():
        theirs = float(rel_l2(twin(torch.from_numpy(xt)), torch.from_numpy(yt)))
    common = dict(threads=args.threads, steps=args.steps, batch=args.batch, data=os.path.basename(path),
                  train_samples=info.sizes["train"], test_samples=info.sizes["test"])
    return [
        dict(name="test relative L2 after training (lower is better)", unit="rel L2", hpcopt=ours,
             peer_name=f"torch {torch.__version__}, same net, init, batches, Adam", peer=theirs,
             ratio=theirs / ours, limit=None, published_fno_85=0.011, **common),
        dict(name="training time", unit="s", hpcopt=ours_s, peer_name="torch", peer=theirs_s,
             ratio=theirs_s / ours_s, limit=None, **common),
    ]
