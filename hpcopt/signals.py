"""SIGUSR1 / SIGTERM ask for a checkpoint at the next step boundary all ranks agree on (what Slurm
sends before the walltime, what `kill`, `timeout` and mpirun forward). Installed on the first line of
`hpcopt train` and kept until the process exits: a signal during start-up is honoured at the first step
boundary, one after the final checkpoint changes nothing (the run ends with 0). No MPI, no numpy here.
"""
from __future__ import annotations

import signal
import time


class StopSignals:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received = 0          # the signal number, 0 until one arrives
        self.received_at = 0.0     # time.time() of the first one
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.received = signum
        self.received_at = self.received_at or time.time()

    def install(self) -> None:
        """Idempotent: the first call saves the previous handlers."""
        for s in self.SIGNALS:
            if s not in self._old:
                self._old[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def ignore_from_now(self) -> None:
        """The run has ended (done, or checkpointed on a signal): later signals change nothing, also during
        MPI_Finalize and interpreter shutdown, when Python has put back the default (fatal) actions of
        the handlers it installed but keeps an ignored signal ignored."""
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


# Signal handlers belong to the process: one StopSignals for it, installed as early as `hpcopt train`
# starts (hpcopt/__main__.py and cli.main, before the heavy imports) and handed to the Trainer.
PROCESS = StopSignals()


def install_if_training(argv: list[str]) -> None:
    """Install the handlers when the command trains (`train`, `sweep`; other commands keep the default
    actions)."""
    if argv and argv[0] in ("train", "sweep"):
        PROCESS.install()
