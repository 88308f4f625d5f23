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


class _Proj:
    """A residual block's projection, described as the 1x1 convolution or dense layer it is."""

    def __init__(self, unit):
        a, b = unit.in_shape, unit.out_shape
        self.type = "dense" if unit.projection == "dense" else "conv2d"
        self.in_shape = a
        self.keys = (dict(units=b[0], activation="identity") if self.type == "dense" else
                     dict(channels=b[0], kernel=1, stride=unit.proj_stride, padding=0, dilation=1,
                          activation="identity"))


def add_arguments(p) -> None:
    p.add_argument("--job", default="", help="train this job's model, data, batch, optimizer (adam), lr schedule, "
                   "loss, target normalisation and steps in both (e.g. jobs/darcy_cnn.toml); one process each")
    p.add_argument("--data", default="", help="a regression data file (default: generate Darcy flow here)")
    p.add_argument("--samples", type=int, default=1024, help="generated samples (train + test)")
    p.add_argument("--grid", type=int, default=32, help="generated grid size")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the job's, or 600)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)


def torch_twin(torch, model):
    """The hpcopt Model's network in torch (conv2d, dense, flatten, activation and residual units), with
    its weights."""
    return torch.nn.Sequential(*_twin_modules(torch, model.layers, model.units))


def _twin_modules(torch, layers, units) -> list:
    nn = torch.nn
    acts = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "silu": nn.SiLU}

    class Residual(nn.Module):
        def __init__(self, body, proj, act):
            super().__init__()
            self.body, self.proj, self.act = nn.Sequential(*body), proj, act

        def forward(self, x):
            return self.act(self.body(x) + (self.proj(x) if self.proj is not None else x))

    mods = []
    for layer, unit in zip(layers, units):
        k = unit.keys
        if unit.type == "residual":
            proj = None
            if layer.proj is not None:
                proj = nn.Sequential(*_twin_modules(torch, [layer.proj], [_Proj(unit)]))
            mods.append(Residual(_twin_modules(torch, layer.body, unit.layers), proj,
                                 acts[k.get("activation", "identity")]()))
            continue
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
    return mods


def _job(args):
    """(config, data path, spec, steps, batch) from --job, or the built-in surrogate on --data / generated Darcy."""
    from mpi4py import MPI

    from .. import config, modelspec
    from ..data import inspect

    if args.job:
        cfg = config.load(args.job)
        if cfg.optimizer.name != "adam" or cfg.model.loss not in ("rel_l2", "mse"):
            raise SystemExit(f"bench surrogate --job {args.job}: the torch twin trains adam on rel_l2 or mse")
        info = inspect(cfg.data.path)
        batch = cfg.data.batch_size
        steps = args.steps or cfg.run.steps or cfg.run.epochs * (info.sizes["train"] // batch)
        return cfg, cfg.data.path, modelspec.from_config(cfg.model, args.job), steps, batch, info
    path = args.data
    if not path:
        from ..data.pde import make_pde

        path = f"bench-darcy-{args.grid}-{args.samples}.h5"
        if not os.path.exists(path):
            make_pde("darcy2d", path, args.samples, args.grid, seed=0, test_fraction=0.2, comm=MPI.COMM_SELF)
    info = inspect(path)
    cfg = config.load(None, [f"model.input={list(info.x_shape)}", f"model.layer={SURROGATE}", "model.loss=rel_l2",
                             f"optimizer.lr={args.lr}", f"data.path={path}"])
    return cfg, path, modelspec.from_config(cfg.model, "bench"), args.steps or 600, args.batch, info


def rel_l2_r2(out: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean per-sample relative L2 error and R² over all values (float64), in the data's units."""
    out, y = out.reshape(len(out), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    rel = np.linalg.norm(out - y, axis=1) / np.linalg.norm(y, axis=1)
    r2 = 1 - ((out - y) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum()
    return float(rel.mean()), float(r2)


def run(args) -> list[dict]:
    import torch

    from ..data import ShardedLoader
    from ..data.importer import read_stats
    from ..nn import Model
    from ..nn.layers import Ctx
    from ..optim import base_lr
    from ..optim.schedules import lr_at
    from ..parallel.update import Update

    torch.set_num_threads(args.threads)
    cfg, path, spec, steps, batch, info = _job(args)
    loss = cfg.model.loss
    scale = read_stats(path) if cfg.data.normalize_targets else None
    lr0 = base_lr(cfg.optimizer)
    lrs = [lr_at(s, lr0, cfg.schedule, cfg.schedule.total_steps or steps, 1.0) for s in range(steps)]
    model = Model(spec, loss=loss, seed=cfg.run.seed, init=cfg.model.init)
    twin = torch_twin(torch, model)
    f = model.flat
    update = Update(cfg.optimizer, f.data, f.grad, f.segments())
    opt = torch.optim.Adam(twin.parameters(), lr=lr0)
    loader = ShardedLoader(path, "train", batch, 0, 1, seed=cfg.run.seed, target_scale=scale)
    first = loader.batch(0)
    warm = Model(spec, loss=loss, seed=1)   # compile/load every kernel outside the timed loop
    warm.loss_and_grad(*first, batch)
    torch_twin(torch, warm)(torch.from_numpy(first[0])).sum().backward()

    t0 = time.perf_counter()
    for s in range(steps):
        x, y = loader.batch(s)
        model.loss_and_grad(x, y, len(x))
        update.apply(s + 1, lrs[s])
    ours_s = time.perf_counter() - t0

    def torch_loss(out, t):
        out, t = out.reshape(len(out), -1), t.reshape(len(t), -1)
        if loss == "mse":
            return ((out - t) ** 2).sum(dim=1).mean() / 2
        return (torch.linalg.vector_norm(out - t, dim=1) / torch.linalg.vector_norm(t, dim=1)).mean()

    t0 = time.perf_counter()
    for s in range(steps):
        x, y = loader.batch(s)
        for g in opt.param_groups:
            g["lr"] = lrs[s]
        opt.zero_grad()
        torch_loss(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    theirs_s = time.perf_counter() - t0

    test = ShardedLoader(path, "test", 1, 0, 1, seed=0)
    xt, yt = test.slice(0, test.n)
    ours_out, theirs_out = [], []
    for lo in range(0, test.n, 256):
        xb = np.ascontiguousarray(xt[lo:lo + 256])
        ours_out.append(model.forward(xb, ctx=Ctx(training=False))[-1].reshape(len(xb), *yt.shape[1:]))
        with torch.no_grad():
            theirs_out.append(twin(torch.from_numpy(xb)).numpy().reshape(len(xb), *yt.shape[1:]))
    outs = [np.concatenate(ours_out), np.concatenate(theirs_out)]
    if scale is not None:   # trained on (y - mean) / std: judged in the data's units
        outs = [o * scale[1] + scale[0] for o in outs]
    (ours, ours_r2), (theirs, theirs_r2) = rel_l2_r2(outs[0], yt), rel_l2_r2(outs[1], yt)
    common = dict(threads=args.threads, steps=steps, batch=batch, data=os.path.basename(path),
                  train_samples=info.sizes["train"], test_samples=info.sizes["test"],
                  job=os.path.basename(args.job) if args.job else None)
    return [
        dict(name="test relative L2 after training (lower is better)", unit="rel L2", hpcopt=ours,
             peer_name=f"torch {torch.__version__}, same net, init, batches, Adam, lr schedule", peer=theirs,
             ratio=theirs / ours, limit=None, published_fno_85=0.011, r2_hpcopt=ours_r2, r2_torch=theirs_r2,
             **common),
        dict(name="training time", unit="s", hpcopt=ours_s, peer_name="torch", peer=theirs_s,
             ratio=theirs_s / ours_s, limit=None, **common),
    ]
