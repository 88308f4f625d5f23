"""`hpcopt doctor`: check the installation and the launch, one line per check (docs/doctor.md).

Run it the way a job is run (`mpirun -n N hpcopt doctor`, `srun hpcopt doctor`) or alone. Rank 0
prints one line per check: `ok`, `info`, `skip` or `problem`; a problem line says what is wrong and what
to do. Exit codes: 0 no check found a problem, 1 at least one did (EXIT_OK, EXIT_PROBLEM).

Never hangs, never crashes on a problem: every rank calls the same collectives in the same order on
every path. Each rank first collects its facts locally (each step under try: an exception becomes a
fact, later a problem line), then one allgather brings every rank's facts to every rank and rank 0
judges them (`analyze`, a pure function of the facts). The one collective that a broken file system can
stall, the parallel HDF5 test, runs last, after rank 0 has printed the other lines, and a watchdog
(`--timeout`, faulthandler) ends a rank stuck that long in one step with its Python stack and exit 1.

Test hook: HPCOPT_DOCTOR_SIMULATE, a comma-separated list of NAME or NAME@RANK (NAME alone: every
rank), makes a rank report a problem it does not have, so that the tests can check the lines:
    no-mpi-h5py        h5py.get_config().mpi reads false (h5py built without MPI)
    version-mismatch   numpy reports another version ("<version>+simulated")
    unwritable         creating the file in --dir fails with EACCES (Permission denied)
    hang               the rank sleeps instead of joining the parallel HDF5 test (the watchdog must end it)
e.g. HPCOPT_DOCTOR_SIMULATE=version-mismatch@1,unwritable@1. While it is set an `info` line says so.

Nothing heavy (numpy, mpi4py, h5py, numba) is imported at module level: `run` imports mpi4py, sets the
threads per rank as `hpcopt train` does, and only then numpy and the rest.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .diagnosis import ranges

DESCRIPTION = ("Check the installation and the launch: MPI library and launcher, parallel HDF5, ranks per "
               "node, CPU binding and oversubscription, threads per rank, package versions on every rank, an "
               "Allreduce, a parallel HDF5 write and read in --dir, Numba's threading layer and GPU. Run it "
               "under mpirun/srun exactly like a job (or alone). Rank 0 prints one line per check; exit 0 "
               "when nothing is wrong, 1 when a problem was found (docs/doctor.md).")

EXIT_OK, EXIT_PROBLEM = 0, 1
SIMULATE_ENV = "HPCOPT_DOCTOR_SIMULATE"
SIMULATIONS = ("no-mpi-h5py", "version-mismatch", "unwritable", "hang")
PACKAGES = ("python", "hpcopt", "numpy", "numba", "h5py", "mpi4py", "MPI library", "HDF5")
STATUSES = ("ok", "info", "skip", "problem")
DEFAULT_DIR = "runs"
DEFAULT_TIMEOUT = 300.0


@dataclass
class Result:
    check: str
    status: str  # one of STATUSES
    message: str
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status:8} {self.check:17} {self.message}"

    def as_json(self) -> str:
        return json.dumps({"check": self.check, "status": self.status, "message": self.message,
                           "details": self.details}, default=str)


def add_arguments(p) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                   help="directory every rank must be able to write (where the run directories go) and "
                   "where the parallel HDF5 test file is written and removed (default: runs/ under the "
                   "current directory, created if needed)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="threads per rank as backend.threads = N would ask (default 0: as hpcopt picks them: "
                   "OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else the rank's cores / ranks on the node)")
    p.add_argument("--json", action="store_true", help="one JSON object per check (check, status, message, "
                   "details) instead of the table")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"a rank stuck for S seconds in one step (start-up and local checks, the exchange, the "
                   f"parallel HDF5 test) prints its Python stack and exits 1: a hung collective or file system "
                   f"(default {DEFAULT_TIMEOUT:.0f}, 0: never)")


# --------------------------------------------------------------------------------------------- helpers

def simulated(name: str, rank: int, env=os.environ) -> bool:
    """Whether the test hook HPCOPT_DOCTOR_SIMULATE asks this rank to simulate problem `name`."""
    for item in env.get(SIMULATE_ENV, "").split(","):
        what, _, at = item.strip().partition("@")
        if what == name and (not at or (at.strip().isdigit() and int(at) == rank)):
            return True
    return False


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def _int(s) -> int | None:
    try:
        return int(str(s).strip())
    except (TypeError, ValueError):
        return None


def where(ranks, facts) -> str:
    """'rank 1 (host a)' or 'ranks 0-3 (hosts a, b)'."""
    ranks = sorted(set(ranks))
    hosts = list(dict.fromkeys(facts[r]["host"] for r in ranks))
    h = f"host {hosts[0]}" if len(hosts) == 1 else "hosts " + ", ".join(hosts[:3]) + (
        f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
    return f"rank {ranks[0]} ({h})" if len(ranks) == 1 else f"ranks {ranks_text(ranks)} ({h})"


def ranks_text(ranks) -> str:
    return ranges(ranks).replace(",", ", ")


def _by_value(items):
    """{value: [ranks]} in order of first appearance, from (rank, value) pairs."""
    groups: dict = {}
    for r, v in items:
        groups.setdefault(v, []).append(r)
    return groups


def _cores(f) -> set:
    return set(f["affinity"]) if f.get("affinity") else set(range(f.get("cpu_count") or 1))


def _nodes(facts) -> dict:
    """{node leader's world rank: [world ranks on that node]}."""
    nodes: dict = {}
    for f in facts:
        nodes.setdefault(f["node"], []).append(f["rank"])
    return nodes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ------------------------------------------------------------------------------- checks (pure functions)

def launcher_check(env, size: int, library: str = "", mpirun_path: str | None = None) -> Result:
    """What started this process (mpirun, a PMI/PMIx launcher, srun, nothing) and whether MPI agrees."""
    ntasks = _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"))
    started, details = None, {k: env[k] for k in sorted(env) if k in (
        "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID",
        "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_CPUS_PER_TASK")}
    if "OMPI_COMM_WORLD_SIZE" in env:
        name, started = "mpirun (Open MPI)", _int(env["OMPI_COMM_WORLD_SIZE"])
    elif "PMI_SIZE" in env:
        name = "srun --mpi=pmi2" if "SLURM_STEP_ID" in env else "a PMI launcher (mpiexec of MPICH or Intel MPI)"
        started = _int(env["PMI_SIZE"])
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        name = "srun (PMIx)" if "PMIX_RANK" in env else "srun"
        started = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))
    elif "PMIX_RANK" in env:
        name = "a PMIx launcher (prterun, mpirun of Open MPI 5)"
    else:
        name = None
    details.update(launcher=name, started=started, world_size=size, mpirun=mpirun_path)
    lib = f" ({library})" if library else ""
    on_path = f" (mpirun on PATH: {mpirun_path})" if mpirun_path else ""
    if name and started and started > 1 and size == 1:
        if name.startswith("srun") and "PMI_SIZE" not in env and "PMIX_RANK" not in env:
            what = ("srun's MPI plugin does not reach mpi4py's MPI: launch with `srun --mpi=pmix` or "
                    "`--mpi=pmi2` (`srun --mpi=list` shows them), or with the mpirun of mpi4py's MPI")
        else:
            what = (f"the launcher belongs to another MPI than mpi4py's{lib}: start the job with the mpirun/mpiexec "
                    f"of mpi4py's MPI{on_path}, or rebuild mpi4py against the launcher's MPI (make setup)")
        return Result("launcher", "problem", f"{name} started {started} processes but each is an MPI world of 1 "
                      f"(every process prints its own report): {what}", details)
    if name and started and size > 1 and started != size:
        return Result("launcher", "problem", f"{name} says {started} processes but the MPI world has {size} "
                      f"ranks: launcher and MPI library disagree; use the mpirun of mpi4py's MPI{lib}", details)
    if name is None and size == 1 and ntasks and ntasks > 1:
        return Result("launcher", "problem", f"started alone (world size 1) inside a Slurm allocation of "
                      f"SLURM_NTASKS={ntasks} tasks: a missing `srun` (or mpirun) in front of the command? "
                      f"Run `srun hpcopt doctor` to check the launch the job will use", details)
    if name is None:
        return Result("launcher", "ok", f"started alone (no mpirun/srun variables): an MPI world of {size}",
                      details)
    n = f"{started} processes" if started else "the processes"
    return Result("launcher", "ok", f"{name} started {n}: one MPI world of {_plural(size, 'rank')}", details)


def _check_simulate(facts, env) -> list[Result]:
    value = env.get(SIMULATE_ENV, "").strip()
    if not value:
        return []
    names = [item.strip().partition("@")[0] for item in value.split(",") if item.strip()]
    unknown = [n for n in names if n not in SIMULATIONS]
    if unknown:
        return [Result("simulate", "problem", f"{SIMULATE_ENV}={value}: unknown simulation(s) {', '.join(unknown)} "
                       f"(known: {', '.join(SIMULATIONS)}); unset it, it is a test hook")]
    return [Result("simulate", "info", f"test hook {SIMULATE_ENV}={value} is set: the problems it names below are "
                   f"simulated, not real; unset it to check this installation")]


def _uncollected(facts) -> list[int]:
    return [f["rank"] for f in facts if f["errors"].get("collect")]


def _check_collect(facts, env) -> list[Result]:
    bad = [(f["rank"], f["errors"]["collect"]) for f in facts if f["errors"].get("collect")]
    return [Result("collect", "problem", f"collecting the facts of {where(rs, facts)} failed ({e}): a bug in hpcopt "
                   f"doctor; please report it with this output (checks below skip these ranks)", {"ranks": rs})
            for e, rs in _by_value(bad).items()]


def _check_mpi(facts, env) -> list[Result]:
    f0 = facts[0]
    d = dict(library=f0["mpi_library"], version=f0["mpi_version"], mpi4py=f0["versions"].get("mpi4py"))
    msg = f"{f0['mpi_library']}; MPI {f0['mpi_version']}; mpi4py {f0['versions'].get('mpi4py')}"
    out = []
    major = _int(str(f0["mpi_version"]).split(".")[0])
    if major is not None and major < 3:
        out.append(Result("mpi", "problem", f"{msg}: hpcopt needs MPI 3 or later (shared-memory communicators); "
                          f"load a newer MPI and rebuild mpi4py against it (make setup)", d))
    bad = [f["rank"] for f in facts if f["errors"].get("node")]
    if bad:
        out.append(Result("mpi", "problem", f"Split_type(COMM_TYPE_SHARED) failed on {where(bad, facts)} "
                          f"({facts[bad[0]]['errors']['node']}): ranks per node unknown; check the MPI installation",
                          d))
    return out or [Result("mpi", "ok", msg, d)]


def _check_thread_level(facts, env) -> list[Result]:
    f0 = facts[0]
    levels = _by_value((f["rank"], f["thread_level"]) for f in facts)
    d = dict(provided=f0["thread_level"], requested=f0["thread_requested"])
    if len(levels) > 1:
        text = "; ".join(f"{lv} on {where(r, facts)}" for lv, r in levels.items())
        return [Result("thread-level", "info", f"thread levels differ: {text} (hpcopt calls MPI from one thread "
                       f"only: any level works)", d)]
    return [Result("thread-level", "ok", f"{f0['thread_level']} provided (mpi4py asked for "
                   f"{f0['thread_requested']}); hpcopt calls MPI from one thread only: any level works", d)]


def _check_launcher(facts, env) -> list[Result]:
    f0 = facts[0]
    return [launcher_check(f0["env"], len(facts), f0["mpi_library"], f0.get("mpirun"))]


def _check_nodes(facts, env) -> list[Result]:
    nodes = _nodes(facts)
    parts = [f"{facts[lead]['host']} ({_plural(len(r), 'rank')}: {ranges(r)})" for lead, r in nodes.items()]
    per = sorted({len(r) for r in nodes.values()})
    per_text = f"{per[0]} per node" if len(per) == 1 else f"{per[0]}-{per[-1]} per node (uneven)"
    shown = ", ".join(parts[:4]) + (f", and {len(parts) - 4} more nodes" if len(parts) > 4 else "")
    d = {facts[lead]["host"]: r for lead, r in nodes.items()}
    return [Result("nodes", "ok", f"{_plural(len(facts), 'rank')} on {_plural(len(nodes), 'node')}, {per_text}: "
                   f"{shown}", d)]


def _check_threads(facts, env) -> list[Result]:
    groups = _by_value((f["rank"], (f["threads"], f["thread_source"])) for f in facts)
    d = {"threads": [f["threads"] for f in facts]}
    if len(groups) == 1:
        (t, src), = groups
        out = [Result("threads", "ok", f"{_plural(t, 'thread')} per rank ({src}), as `hpcopt train` picks "
                      f"them for BLAS and Numba", d)]
    else:
        text = "; ".join(f"{t} ({src}) on {where(r, facts)}" for (t, src), r in groups.items())
        out = [Result("threads", "info", f"threads per rank differ: {text}", d)]
    idle = []  # ranks bound to more cores than they run threads on: cores left idle
    for ranks in _nodes(facts).values():
        union = set().union(*(_cores(facts[r]) for r in ranks))
        idle += [(r, (facts[r]["threads"], len(_cores(facts[r])))) for r in ranks
                 if _cores(facts[r]) != union and facts[r]["threads"] < len(_cores(facts[r]))]
    for (t, k), rs in _by_value(idle).items():
        out.append(Result("threads", "info", f"{where(rs, facts)}: bound to {k} cores each but {_plural(t, 'thread')} "
                          f"per rank: set backend.threads = {k} (or OMP_NUM_THREADS={k}) to use them all",
                          {"ranks": rs, "threads": t, "bound_cores": k}))
    return out


def _check_binding(facts, env) -> list[Result]:
    out, summary = [], []
    for lead, ranks in _nodes(facts).items():
        host = facts[lead]["host"]
        union = set().union(*(_cores(facts[r]) for r in ranks))
        bound = [r for r in ranks if _cores(facts[r]) != union]
        pairs = [(a, b, _cores(facts[a]) & _cores(facts[b])) for i, a in enumerate(bound) for b in bound[i + 1:]]
        pairs = [p for p in pairs if p[2]]
        if pairs:
            text = "; ".join(f"ranks {a} and {b} share core(s) {ranges(c)}" for a, b, c in pairs[:3])
            more = f" (and {len(pairs) - 3} more pairs)" if len(pairs) > 3 else ""
            shared = sorted({r for a, b, _ in pairs for r in (a, b)})
            out.append(Result("binding", "problem", f"{host}: {text}{more}: their threads compete for those cores "
                              f"while others may idle; bind each rank to cores of its own (mpirun --map-by "
                              f"slot:PE=<threads> --bind-to core, srun --cpu-bind=cores --cpus-per-task=<threads>) "
                              f"or not at all (--bind-to none)",
                              {"host": host, "ranks": shared,
                               "affinity": {r: ranges(_cores(facts[r])) for r in shared}}))
        elif not bound:
            summary.append(f"{host}: not bound (each rank may run on cores {ranges(union)})")
        else:
            shown = ", ".join(f"rank {r}: {ranges(_cores(facts[r]))}" for r in ranks[:4])
            summary.append(f"{host}: bound to cores of their own ({shown}{', ...' if len(ranks) > 4 else ''})")
    if out:
        return out
    return [Result("binding", "ok", "; ".join(summary[:3]) + ("; ..." if len(summary) > 3 else ""),
                   {"affinity": [ranges(_cores(f)) for f in facts]})]


def _check_oversubscription(facts, env) -> list[Result]:
    out, summary = [], []
    advice = ("use fewer ranks per node or fewer threads per rank (OMP_NUM_THREADS, backend.threads, "
              "srun --cpus-per-task) so that ranks x threads <= cores")
    for lead, ranks in _nodes(facts).items():
        host = facts[lead]["host"]
        union = set().union(*(_cores(facts[r]) for r in ranks))
        cpus = max((facts[r].get("cpu_count") or 0) for r in ranks) or len(union)
        threads = [facts[r]["threads"] for r in ranks]
        total = sum(threads)
        how = (f"{_plural(len(ranks), 'rank')} x {_plural(threads[0], 'thread')} = {_plural(total, 'thread')}"
               if len(set(threads)) == 1 else f"{_plural(len(ranks), 'rank')} with {total} threads in all")
        cores = _plural(len(union), "core") + (f" (the ranks may use {len(union)} of the node's {cpus})"
                                         if len(union) < cpus else "")
        d = {"host": host, "ranks": len(ranks), "threads": total, "cores": len(union), "cpu_count": cpus}
        if total > len(union):
            out.append(Result("oversubscription", "problem", f"{host}: {how} on {cores}: ranks and threads wait "
                              f"for cores (slow, timings meaningless); {advice}", d))
            continue
        tight = [(r, facts[r]["threads"], len(_cores(facts[r]))) for r in ranks
                 if _cores(facts[r]) != union and facts[r]["threads"] > len(_cores(facts[r]))]
        for (t, k), rs in _by_value((r, (t, k)) for r, t, k in tight).items():
            out.append(Result("oversubscription", "problem", f"{where(rs, facts)}: {_plural(t, 'thread')} per rank "
                              f"on {_plural(k, 'bound core')} each: bind each rank to {t} cores (mpirun --map-by "
                              f"slot:PE={t} --bind-to core, srun --cpus-per-task={t}) or set OMP_NUM_THREADS={k}",
                              dict(d, ranks_affected=rs, threads_per_rank=t, bound_cores=k)))
        summary.append(f"{host}: {how} on {cores}")
    if out:
        return out
    return [Result("oversubscription", "ok", "; ".join(summary[:3]) + ("; ..." if len(summary) > 3 else ""))]


def _check_versions(facts, env) -> list[Result]:
    out = []
    for pkg in PACKAGES:
        failed = [(f["rank"], f["errors"].get(f"import {pkg}")) for f in facts if f["versions"].get(pkg) is None
                  and not (pkg == "HDF5" and f["versions"].get("h5py") is None)  # said once, for h5py
                  and not f["errors"].get("collect")]  # said by the check `collect`
        for e, rs in _by_value(failed).items():
            out.append(Result("versions", "problem", f"{where(rs, facts)} cannot import {pkg} ({e or 'unknown'}): "
                              f"install it in the environment every rank runs (make setup)",
                              {"package": pkg, "ranks": rs}))
        have = [(f["rank"], f["versions"][pkg]) for f in facts
                if f["versions"].get(pkg) is not None and not f["errors"].get("collect")]
        groups = _by_value(have)
        if len(groups) <= 1:
            continue
        common = Counter(v for _, v in have).most_common(1)[0][0]  # ties: rank 0's value (seen first)
        ref = groups[common][0]
        for v, rs in groups.items():
            if v == common:
                continue
            out.append(Result("versions", "problem", f"{pkg} differs: {where(rs, facts)} has {v}, "
                              f"{where([ref], facts)} has {common}: run every rank from one installation (the same "
                              f".venv on a shared file system, the same modules loaded on every node)",
                              {"package": pkg, "ranks": rs, "version": v, "expected": common}))
    if out:
        return out
    if _uncollected(facts):
        return [Result("versions", "skip", f"not compared: no facts from {where(_uncollected(facts), facts)}")]
    v = facts[0]["versions"]
    text = ", ".join(f"{p} {v[p]}" for p in PACKAGES if p not in ("MPI library",))
    on = f"on all {len(facts)} ranks" if len(facts) > 1 else "(1 rank)"
    return [Result("versions", "ok", f"equal {on}: {text}", dict(v))]


def _check_h5py(facts, env) -> list[Result]:
    have = [f for f in facts if f["versions"].get("h5py") is not None]
    if not have:
        return [Result("h5py", "skip", "h5py cannot be imported (see versions)")]
    out = []
    bad = [(f["rank"], f["errors"]["h5py_mpi"]) for f in have if f["errors"].get("h5py_mpi")]
    for e, rs in _by_value(bad).items():
        out.append(Result("h5py", "problem", f"h5py on {where(rs, facts)} cannot tell whether it has MPI ({e}): "
                          f"reinstall it with `make setup`", {"ranks": rs}))
    serial = [f["rank"] for f in have if f["h5py_mpi"] is False]
    if serial:
        out.append(Result("h5py", "problem", f"h5py on {where(serial, facts)} was built without MPI: checkpoints "
                          f"and `data make` need parallel HDF5; run `make setup` (builds h5py against parallel "
                          f"HDF5; on a cluster with HDF5_DIR set, docs/slurm.md)", {"ranks": serial}))
    if out:
        return out
    f0 = have[0]
    return [Result("h5py", "ok", f"h5py {f0['versions']['h5py']} with MPI on HDF5 {f0['versions'].get('HDF5')}: "
                   f"parallel HDF5 (mpio driver)", {"mpi": True})]


def _check_numba(facts, env) -> list[Result]:
    have = [f for f in facts if f["versions"].get("numba") is not None]
    if not have:
        return [Result("numba", "skip", "numba cannot be imported (see versions)")]
    bad = [(f["rank"], f["errors"]["numba_layer"]) for f in have if f["errors"].get("numba_layer")]
    out = [Result("numba", "problem", f"numba on {where(rs, facts)} cannot start a threading layer ({e}): install "
                  f"tbb or an OpenMP runtime, or set NUMBA_THREADING_LAYER=workqueue", {"ranks": rs})
           for e, rs in _by_value(bad).items()]
    if out:
        return out
    layers = _by_value((f["rank"], f["numba"]["layer"]) for f in have)
    f0 = have[0]
    nb = f0["numba"]
    layer = (f"threading layer {nb['layer']}" if len(layers) == 1 else
             "threading layers " + "; ".join(f"{lv} on {where(r, facts)}" for lv, r in layers.items()))
    return [Result("numba", "ok", f"numba {f0['versions']['numba']}: {layer}, {_plural(nb['threads'], 'thread')} "
                   f"per rank for its kernels (NUMBA_NUM_THREADS={nb['max_threads']})", dict(nb))]


def _check_cuda(facts, env) -> list[Result]:
    have = [f for f in facts if f.get("cuda")]
    if not have:
        return [Result("cuda", "info", "numba.cuda could not be asked (see numba): backend.device = \"cpu\" only")]
    sim = [f["rank"] for f in have if f["cuda"].get("simulator")]
    if sim:
        return [Result("cuda", "info", f"Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1) on {where(sim, facts)}: "
                       f"backend.device = \"cuda\" runs simulated kernels (slow; for tests)")]
    gpus = [f for f in have if f["cuda"].get("available")]
    if gpus:
        per_host = {}
        for f in gpus:
            per_host.setdefault(f["host"], f["cuda"]["devices"])
        text = "; ".join(f"{h}: {len(d)} x {', '.join(sorted(set(d))) or '?'}" for h, d in list(per_host.items())[:3])
        none = [f["rank"] for f in have if not f["cuda"].get("available")]
        tail = f"; none on {where(none, facts)}" if none else ""
        return [Result("cuda", "ok" if not none else "info", f"numba.cuda sees GPUs ({text}){tail}: "
                       f"backend.device = \"cuda\" can run", {"hosts": per_host})]
    reasons = _by_value((f["rank"], f["cuda"].get("reason") or "no GPU") for f in have)
    reason = next(iter(reasons))
    return [Result("cuda", "info", f"no GPU that numba.cuda can use ({reason}): backend.device = \"cuda\" would be "
                   f"refused; \"cpu\" (the default) works - not a problem")]


def _check_allreduce(facts, env) -> list[Result]:
    bad = [(f["rank"], f["allreduce"].get("error")) for f in facts if not f["allreduce"].get("ok")]
    if bad:
        return [Result("allreduce", "problem", f"Allreduce failed on {where(rs, facts)} ({e}): the MPI library or its "
                       f"network does not work; try `mpirun -n 2 python -c \"from mpi4py import MPI\"` and ask the "
                       f"site which MPI and network settings jobs use", {"ranks": rs})
                for e, rs in _by_value(bad).items()]
    us = facts[0]["allreduce"].get("us")
    return [Result("allreduce", "ok", f"Allreduce (sum, max) over {_plural(len(facts), 'rank')} correct; "
                   f"{us:.0f} us per 8-byte Allreduce (median of 21 on rank 0)", {"us": us})]


def _check_directory(facts, env) -> list[Result]:
    out = []
    d0 = facts[0]["dir"]["path"]
    bad = [(f["rank"], f["dir"]["error"]) for f in facts if f["dir"]["error"] and not f["errors"].get("collect")]
    for e, rs in _by_value(bad).items():
        out.append(Result("directory", "problem", f"{where(rs, facts)} cannot create and write a file in {d0} ({e}): "
                          f"pass --dir (and run.out_dir) a directory every rank can write", {"ranks": rs, "dir": d0}))
    if facts[0]["dir"]["error"] is None:
        blind = [f["rank"] for f in facts if f["dir"]["error"] is None and f["dir"]["sees_rank0"] is False]
        if blind:
            out.append(Result("directory", "problem", f"{where(blind, facts)} do not see the file rank 0 created in "
                              f"{d0}: not one file system shared by all ranks (node-local?); checkpoints and data "
                              f"files need a directory every node shares", {"ranks": blind, "dir": d0}))
    paths = _by_value((f["rank"], f["dir"]["path"]) for f in facts)
    if len(paths) > 1:
        out.append(Result("directory", "info", "ranks resolve --dir to different paths (different working "
                          "directories?): " + "; ".join(f"{p} on {where(r, facts)}" for p, r in paths.items())))
    if any(r.status == "problem" for r in out):
        return out
    if _uncollected(facts):
        return [Result("directory", "skip", f"not checked on {where(_uncollected(facts), facts)} (see collect)")]
    shared = "one file system shared by all ranks" if len(facts) > 1 else "one rank"
    return out + [Result("directory", "ok", f"every rank can create and write a file in {d0} ({shared})",
                         {"dir": d0})]


CHECKS = (("simulate", _check_simulate), ("collect", _check_collect), ("mpi", _check_mpi),
          ("thread-level", _check_thread_level), ("launcher", _check_launcher), ("nodes", _check_nodes), ("threads", _check_threads),
          ("binding", _check_binding), ("oversubscription", _check_oversubscription),
          ("versions", _check_versions), ("h5py", _check_h5py), ("allreduce", _check_allreduce),
          ("directory", _check_directory), ("numba", _check_numba), ("cuda", _check_cuda))


def analyze(facts: list[dict], env=None) -> list[Result]:
    """The result lines for every rank's facts (a list indexed by world rank, see `collect`). A check that
    raises becomes a problem line, never a crash."""
    env = os.environ if env is None else env
    out = []
    for name, fn in CHECKS:
        try:
            out += fn(facts, env)
        except Exception as e:  # noqa: BLE001 - a bug in one check must not hide the others
            out.append(Result(name, "problem", f"the check itself failed ({_err(e)}): a bug in hpcopt doctor; "
                              f"please report it with this output"))
    return out


def hdf5_decision(facts) -> str | None:
    """None when every rank can take part in the parallel HDF5 test, else why it is skipped (the same on
    every rank: it is computed from the gathered facts)."""
    for pkg in ("numpy", "h5py"):
        if any(f["versions"].get(pkg) is None for f in facts):
            return f"{pkg} cannot be imported on every rank (see versions)"
    if not all(f["h5py_mpi"] for f in facts):
        return "h5py without MPI (see h5py)"
    if any(f["dir"]["error"] for f in facts):
        return "not every rank can write the directory (see directory)"
    if len({f["versions"]["h5py"] for f in facts}) > 1:
        return "h5py versions differ (see versions)"
    return None


def _check_parallel_hdf5(facts, outcomes, skip_reason, path) -> list[Result]:
    if skip_reason:
        return [Result("parallel-hdf5", "skip", f"not run: {skip_reason}")]
    bad = [(o["rank"], o["error"]) for o in outcomes if o["error"]]
    if bad:
        return [Result("parallel-hdf5", "problem", f"collective write and read of {path} failed on {where(rs, facts)} "
                       f"({e}): --dir must be on a file system MPI-IO can write in parallel (Lustre, GPFS, NFS with "
                       f"locking), and h5py and mpi4py must use the same MPI (make setup)", {"ranks": rs, "file": path})
                for e, rs in _by_value(bad).items()]
    s = max(o["seconds"] for o in outcomes)
    n = len(facts)
    return [Result("parallel-hdf5", "ok", f"{_plural(n, 'rank')} wrote a {n}x8 dataset collectively through the mpio "
                   f"driver and read it back correctly in {s:.2f} s ({path}, removed)", {"seconds": s, "file": path})]


# --------------------------------------------------------------------------------- per-rank fact gathering

def _import_version(name: str):
    import importlib

    return importlib.import_module(name).__version__


def _numba_facts(threads: int) -> dict:
    import numba

    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)  # starts the threading layer
    try:
        from numba.np.ufunc.parallel import _launch_threads  # private; set_num_threads has launched them
        _launch_threads()
    except ImportError:  # another numba: compile a parallel loop instead
        import numpy as np

        @numba.njit(parallel=True)
        def touch(a):
            for i in numba.prange(a.size):
                a[i] = i
        touch(np.zeros(4))
    return {"layer": numba.threading_layer(), "threads": numba.get_num_threads(),
            "max_threads": numba.config.NUMBA_NUM_THREADS, "configured": numba.config.THREADING_LAYER}


def _cuda_facts() -> dict:
    import warnings

    import numba

    if numba.config.ENABLE_CUDASIM:
        return {"available": True, "simulator": True, "devices": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from numba import cuda

        if not cuda.is_available():
            try:
                reason = cuda.cuda_error()
            except Exception as e:  # noqa: BLE001
                reason = _err(e)
            lines = [s.strip() for s in str(reason or "").splitlines() if s.strip()]
            return {"available": False, "reason": lines[0].rstrip(".") if lines else "no CUDA device"}
        devs = []
        for d in cuda.list_devices():
            name = d.name
            devs.append(name.decode() if isinstance(name, bytes) else str(name))
        return {"available": True, "devices": devs}


def _library_line(MPI):
    return lambda: MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()


def _dir_facts(directory: str, rank: int, simulate_unwritable: bool) -> dict:
    path = os.path.abspath(directory)
    out = {"path": path, "error": None, "sees_rank0": None}
    tmp = os.path.join(path, f".hpcopt-doctor-{socket.gethostname()}-{os.getpid()}-{rank}.tmp")
    payload = f"hpcopt doctor rank {rank}\n".encode() * 64
    try:
        if simulate_unwritable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), tmp)
        os.makedirs(path, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp, "rb") as fh:
            if fh.read() != payload:
                out["error"] = "the file read back differs from what was written"
    except OSError as e:
        out["error"] = e.strerror or _err(e)
    except Exception as e:  # noqa: BLE001
        out["error"] = _err(e)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return out


def collect(rank: int, MPI, node: dict, threads: int, thread_source: str, directory: str, env=os.environ) -> dict:
    """This rank's facts (no communication). Every step under try: a failure is recorded in `errors`."""
    errors: dict = {}

    def attempt(key, fn, default=None):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            errors[key] = _err(e)
            return default

    import mpi4py
    import shutil

    from . import __version__

    levels = {getattr(MPI, f"THREAD_{n}"): f"MPI_THREAD_{n}" for n in ("SINGLE", "FUNNELED", "SERIALIZED",
                                                                       "MULTIPLE")}
    f: dict = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "executable": sys.executable,
               "cpu_count": os.cpu_count(), "threads": threads, "thread_source": thread_source,
               "errors": errors, **node}
    if node.get("node_error"):
        errors["node"] = node["node_error"]
    f["affinity"] = attempt("affinity", lambda: sorted(os.sched_getaffinity(0)))
    f["mpi_library"] = attempt("mpi_library", _library_line(MPI), "?")
    f["mpi_version"] = attempt("mpi_version", lambda: "%d.%d" % MPI.Get_version(), "?")
    f["thread_level"] = attempt("thread_level", lambda: levels.get(MPI.Query_thread(), str(MPI.Query_thread())), "?")
    f["thread_requested"] = getattr(mpi4py.rc, "thread_level", "?")
    f["env"] = {k: v for k, v in env.items() if k.startswith(("OMPI_COMM_WORLD_", "PMI_", "PMIX_RANK", "SLURM_"))}
    f["mpirun"] = shutil.which("mpirun") or shutil.which("mpiexec")
    v = {"python": platform.python_version(), "hpcopt": __version__, "mpi4py": mpi4py.__version__,
         "MPI library": f["mpi_library"]}
    for pkg in ("numpy", "h5py", "numba"):
        v[pkg] = attempt(f"import {pkg}", lambda pkg=pkg: _import_version(pkg))
    if v["numpy"] is not None and simulated("version-mismatch", rank, env):
        v["numpy"] += "+simulated"
    f["h5py_mpi"] = None
    if v["h5py"] is not None:
        import h5py

        v["HDF5"] = attempt("import HDF5", lambda: h5py.version.hdf5_version)
        f["h5py_mpi"] = attempt("h5py_mpi", lambda: bool(h5py.get_config().mpi))
        if simulated("no-mpi-h5py", rank, env):
            f["h5py_mpi"] = False
    else:
        v["HDF5"] = None
        errors["import HDF5"] = "h5py cannot be imported"
    f["versions"] = v
    f["numba"] = f["cuda"] = None
    if v["numba"] is not None:
        f["numba"] = attempt("numba_layer", lambda: _numba_facts(threads))
        f["cuda"] = attempt("cuda", _cuda_facts)
    f["dir"] = _dir_facts(directory, rank, simulated("unwritable", rank, env))
    return f


def _fallback_facts(rank: int, node: dict, threads: int, thread_source: str, directory: str, error: str) -> dict:
    """What `collect` would return, every fact unknown: `collect` itself failed (a bug) on this rank."""
    pkgs = ("numpy", "h5py", "numba", "HDF5", "mpi4py", "python", "hpcopt")
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "executable": sys.executable,
            "cpu_count": os.cpu_count(), "threads": threads, "thread_source": thread_source, **node,
            "errors": {"collect": error}, "affinity": None, "mpi_library": "?", "mpi_version": "?",
            "thread_level": "?", "thread_requested": "?", "env": {}, "mpirun": None,
            "versions": {p: None for p in (*pkgs, "MPI library")}, "h5py_mpi": None, "numba": None,
            "cuda": None, "dir": {"path": os.path.abspath(directory), "error": "not checked", "sees_rank0": None}}


def _allreduce(world, MPI) -> dict:
    """A few numbers summed and a max over all ranks, checked; and the time of a small Allreduce."""
    from array import array

    rank, size = world.Get_rank(), world.Get_size()
    try:
        send, got = array("d", [rank + 1.0, 1.0, 0.5 * rank]), array("d", [0.0] * 3)
        world.Allreduce([send, MPI.DOUBLE], [got, MPI.DOUBLE], op=MPI.SUM)
        mine, top = array("q", [rank]), array("q", [-1])
        world.Allreduce([mine, MPI.INT64_T], [top, MPI.INT64_T], op=MPI.MAX)
        expect = [size * (size + 1) / 2, float(size), 0.25 * size * (size - 1)]
        if list(got) != expect or top[0] != size - 1:
            return {"ok": False, "error": f"wrong result: sum {list(got)} (expected {expect}), max {top[0]} "
                                          f"(expected {size - 1})"}
        world.Barrier()  # time the Allreduce, not the wait for ranks still finishing their local checks
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            world.Allreduce([send, 1, MPI.DOUBLE], [got, 1, MPI.DOUBLE], op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        return {"ok": True, "error": None, "us": sorted(times)[10] * 1e6}  # median: robust to a descheduled rank
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _err(e)}


def _parallel_hdf5(world, path: str) -> dict:
    """Collective: all ranks write their row of one dataset through the mpio driver, then read all rows."""
    rank, size = world.Get_rank(), world.Get_size()
    out = {"rank": rank, "error": None, "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        import h5py
        import numpy as np

        with h5py.File(path, "w", driver="mpio", comm=world) as fh:
            ds = fh.create_dataset("x", (size, 8), dtype="f8")
            with ds.collective:
                ds[rank:rank + 1] = np.arange(8.0)[None] + 8 * rank
        with h5py.File(path, "r", driver="mpio", comm=world) as fh:
            got = fh["x"][...]
        bad = [r for r in range(size) if not np.array_equal(got[r], np.arange(8.0) + 8 * r)]
        if bad:
            out["error"] = (f"read back wrong values in the rows of rank(s) {ranges(bad)} (the ranks do not see "
                            f"one file: a node-local directory?)")
    except Exception as e:  # noqa: BLE001
        out["error"] = _err(e)
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------- run

class _Printer:
    """Rank 0 prints each result as it is known (a crash later leaves the earlier lines on screen)."""

    def __init__(self, as_json: bool, active: bool):
        self.as_json, self.active, self.problems = as_json, active, 0

    def header(self, text: str) -> None:
        if not self.as_json:
            self.print(text)

    def emit(self, results) -> None:
        for r in results:
            self.problems += r.status == "problem"
            self.print(r.as_json() if self.as_json else r.line())

    def print(self, text: str) -> None:
        if self.active:
            try:
                print(text, flush=True)
            except OSError:  # the reader went away (`| head`): stay in the collectives, print no more
                self.active = False


def run(args) -> int:
    import faulthandler

    rank0 = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        from mpi4py import MPI
    except Exception as e:  # noqa: BLE001 - no MPI at all: one line, from the process meant to be rank 0
        pr = _Printer(args.json, rank0 == "0")
        pr.emit([Result("mpi", "problem", f"cannot load mpi4py and its MPI library ({_err(e)}): run `make setup` "
                        f"(mpi4py built against the MPI that mpirun/srun belongs to; docs/slurm.md)")])
        return EXIT_PROBLEM
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    faulthandler.enable()  # a crash in a library prints where it happened

    def watchdog() -> None:
        """(Re)start the clock of this step: a rank still in it after --timeout s prints its stack, exits 1.
        faulthandler's thread needs no GIL: it fires even inside a call into libhdf5 or MPI."""
        if args.timeout and args.timeout > 0:
            faulthandler.dump_traceback_later(args.timeout, exit=True)

    watchdog()
    try:
        return _run(args, MPI, world, rank, size, watchdog)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _run(args, MPI, world, rank: int, size: int, watchdog) -> int:
    from .threads import pin_threads, threads_per_rank

    node = {"node": rank, "local_rank": 0, "local_size": 1, "node_error": None}
    try:  # collective: every rank calls it
        comm = world.Split_type(MPI.COMM_TYPE_SHARED)
        node.update(local_rank=comm.Get_rank(), local_size=comm.Get_size(), node=comm.bcast(rank))
        comm.Free()
    except Exception as e:  # noqa: BLE001
        node["node_error"] = _err(e)
    threads, source = threads_per_rank(max(0, args.threads), node["local_size"])
    if args.threads > 0:
        source = "--threads, as backend.threads"
    pin_threads(threads)  # as `hpcopt train`: before numpy (BLAS) is imported

    try:
        facts = collect(rank, MPI, node, threads, source, args.dir)
    except Exception as e:  # noqa: BLE001 - a bug here must still let this rank join the collectives
        facts = _fallback_facts(rank, node, threads, source, args.dir, _err(e))
    watchdog()
    token = None
    if rank == 0 and facts["dir"]["error"] is None:
        try:  # a file every rank must then see: one shared file system?
            token = f"{os.getpid()}-{time.time_ns():x}"
            with open(os.path.join(facts["dir"]["path"], f".hpcopt-doctor-{token}"), "w") as fh:
                fh.write("hpcopt doctor\n")
        except OSError as e:
            facts["dir"]["error"] = e.strerror or _err(e)
            token = None
    token = world.bcast(token)
    marker = os.path.join(facts["dir"]["path"], f".hpcopt-doctor-{token}") if token else None
    if marker and facts["dir"]["error"] is None:
        for _ in range(10):  # a network file system may show a new name a moment late
            facts["dir"]["sees_rank0"] = os.path.exists(marker)
            if facts["dir"]["sees_rank0"]:
                break
            time.sleep(0.2)
    facts["allreduce"] = _allreduce(world, MPI)
    all_facts = world.allgather(facts)
    if rank == 0 and marker:  # every rank has looked for it (before the allgather)
        try:
            os.unlink(marker)
        except OSError:
            pass

    printer = _Printer(args.json, rank == 0)
    h5path = os.path.join(all_facts[0]["dir"]["path"], f".hpcopt-doctor-{token}.h5") if token else None
    try:
        if rank == 0:
            nodes = len(_nodes(all_facts))
            printer.header(f"hpcopt doctor: {_plural(size, 'rank')} on {_plural(nodes, 'node')}, directory "
                           f"{all_facts[0]['dir']['path']}")
            printer.emit(analyze(all_facts))
        skip = None
        try:
            skip = hdf5_decision(all_facts)
        except Exception as e:  # noqa: BLE001
            skip = f"could not decide ({_err(e)})"
        if skip is None and not h5path:
            skip = "rank 0 cannot write the directory (see directory)"
        watchdog()
        if simulated("hang", rank):
            time.sleep(1e6)  # test hook: this rank never joins; the others wait in the collective below
        outcome = {"rank": rank, "error": None, "seconds": 0.0} if skip else _parallel_hdf5(world, h5path)
        outcomes = world.gather(outcome)
        if rank == 0:
            try:
                printer.emit(_check_parallel_hdf5(all_facts, outcomes, skip, h5path))
            except Exception as e:  # noqa: BLE001
                printer.emit([Result("parallel-hdf5", "problem", f"the check itself failed ({_err(e)}): a bug in "
                                     f"hpcopt doctor; please report it with this output")])
    finally:
        if rank == 0:
            try:
                if h5path and os.path.exists(h5path):
                    os.unlink(h5path)
            except OSError:
                pass
    code = EXIT_PROBLEM if printer.problems else EXIT_OK
    code = world.bcast(code)
    if not args.json:
        n = printer.problems
        printer.header(f"{_plural(n, 'problem')} found: exit {code}" if n else f"no problems found: exit {code}")
    return code
