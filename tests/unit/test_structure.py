"""The shape of the package that the next features land on (issue 11): one update path, strategies
composed (no constructor skips its base's), no import circles, the Trainer never reaches into the
optimizer. Read from the source, so a regression fails here and not in a review."""
import ast
import os
import re

from hpcopt import config, parallel
from tests.conftest import REPO

PKG = os.path.join(REPO, "hpcopt")


def sources():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield path, open(path).read()


def test_clip_and_check_has_one_call_site():
    calls = [(p, i) for p, text in sources() for i, line in enumerate(text.splitlines(), 1)
             if "clip_and_check(" in line and not line.lstrip().startswith("def ")]
    assert len(calls) == 1 and calls[0][0].endswith(os.path.join("parallel", "update.py")), calls


def test_no_class_in_parallel_skips_its_base_constructor():
    for path, text in sources():
        if os.sep + "parallel" + os.sep not in path:
            continue
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ClassDef) or not node.bases:
                continue
            init = next((b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"), None)
            if init is None:
                continue
            calls_super = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "__init__"
                              for n in ast.walk(init))
            bases = [ast.unparse(b) for b in node.bases]
            assert calls_super, f"{path}: {node.name}({bases}) skips its base constructor"


def imports_of(path: str, text: str) -> set[str]:
    """Every hpcopt module this one imports, at module level or inside functions."""
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hpcopt"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hpcopt"))
    return out


def test_no_import_circle_in_the_package():
    modules = {}
    for path, text in sources():
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        modules[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = (path, text)
    graph = {m: {t for t in imports_of(p, s) if t in modules and t != m} for m, (p, s) in modules.items()}
    # a package's __init__ importing its own submodules is how Python packages work, not a circle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_trainer_reads_no_attribute_of_the_optimizer():
    for name in ("train.py", "cli.py"):
        text = open(os.path.join(PKG, name)).read()
        assert not re.search(r"strategy\.(opt|update)\b", text), name
    from mpi4py import MPI

    from hpcopt.comm import Grid

    c = MPI.COMM_SELF
    s = parallel.build(config.load(None, []), Grid(c, 1, 1, 1, 0, 0, 0, c, c, c), 64)
    assert not hasattr(s, "opt")  # the optimizer lives in s.update, behind apply_update


def test_the_cli_and_the_parallel_package_load_nothing_heavy():
    """BLAS reads its thread count when numpy loads, and a process that initialised MPI cannot launch
    mpirun (the benchmarks do): building the CLI and importing hpcopt.parallel must load neither."""
    import subprocess
    import sys

    code = ("import sys; from hpcopt import cli; cli.build_parser(); import hpcopt.parallel, hpcopt.config; "
            "print(sorted(m for m in ('numpy', 'mpi4py.MPI', 'numba', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
