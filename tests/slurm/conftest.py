"""The `slurm` marker and the session's Slurm cluster (see cluster.py)."""
from __future__ import annotations

import pytest

from .cluster import SlurmCluster, install_reason


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running slurmctld + slurmd for the session; skips every Slurm test with one reason if none can be had."""
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


_TIMINGS: list[str] = []


@pytest.fixture(scope="session")
def timings() -> list[str]:
    """Lines of measured timing (signal -> checkpoint, restart -> first step) shown after the run."""
    return _TIMINGS


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("Slurm timing (2 ranks, digits MLP)")
        for line in _TIMINGS:
            terminalreporter.write_line(line)
