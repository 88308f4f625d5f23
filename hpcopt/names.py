"""Every name a job file may use, one table each, where each registry finds its entries (numpy-free).

The config (which imports no numpy, so the CLI can read a job before numpy and BLAS load) takes its
`choices` from here, and so do the registries that build the things named:
    OPTIMIZERS   optim.REGISTRY imports "module:Class" and checks the class declares the name
    STRATEGIES   parallel.build composes the strategy named (parallel/__init__.py)
    CODECS       parallel.compress.build
    PIPELINE_SCHEDULES, LR_SCHEDULES, ACTIVATIONS, LOSSES, INITS, DEVICES
A test (tests/unit/test_names.py) checks every registry against these tables, so a name is added
in one place and the error messages, docs/config.md and the registries follow.
"""
from __future__ import annotations

# optimizer.name -> "module:Class" (the class's `defaults` holds the name's hyperparameter defaults);
# the order is the docs' and the benchmark's
OPTIMIZERS: dict[str, str] = {
    "sgd": "hpcopt.optim.sgd:SGD", "momentum": "hpcopt.optim.sgd:SGD", "nesterov": "hpcopt.optim.sgd:SGD",
    "adagrad": "hpcopt.optim.adagrad:Adagrad", "rmsprop": "hpcopt.optim.rmsprop:RMSprop",
    "adadelta": "hpcopt.optim.adadelta:Adadelta", "adam": "hpcopt.optim.adam:Adam",
    "adamw": "hpcopt.optim.adam:Adam", "adamax": "hpcopt.optim.adam:Adamax", "nadam": "hpcopt.optim.adam:NAdam",
    "lars": "hpcopt.optim.lars:LARS", "lamb": "hpcopt.optim.lars:LAMB",
}

# parallel.strategy -> what it is (parallel/__init__.py composes each from parts)
STRATEGIES: dict[str, str] = {
    "data": "replicas; gradients summed by bucketed Allreduce (reduce-scatter with zero = 1)",
    "pipeline": "stages of consecutive layers over pp ranks; micro-batches flow through them",
    "tensor": "dense pairs split column/row over tp ranks",
    "hybrid": "dp x pp x tp: pipeline stages of tensor-parallel layers, replicated over dp",
    "local_sgd": "replicas stepping alone, averaged every average_every steps",
    "async": "a parameter server (dp rank 0) applying workers' gradients as they arrive",
}

CODECS = ("none", "fp16", "bf16", "topk")                # parallel.compression (parallel/compress.py)
PIPELINE_SCHEDULES = ("gpipe", "1f1b")                   # parallel.schedule (parallel/schedule.py)
LR_SCHEDULES = ("constant", "step", "exponential", "cosine", "linear")   # schedule.name (optim/schedules.py)
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "silu")  # model.activation, layers' (kernels/cpu.py)
LOSSES = ("softmax_ce", "mse", "l1", "huber", "rel_l2")  # model.loss (nn/losses.py LOSSES)
INITS = ("he", "xavier")                                 # model.init (nn/layers.py Dense.init)
DEVICES = ("cpu", "cuda")                                # backend.device (optim/base.py kernels)
