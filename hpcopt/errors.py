"""User-facing errors. The CLI turns each into one line on stderr and its exit code; nothing else does."""


class HpcoptError(Exception):
    """A mistake of the user's (bad config, bad data, bad path), not a bug: no traceback is shown."""

    exit_code = 1
    all_ranks = False  # True when every MPI rank raises it alike (then each exits; no abort needed)


class ConfigError(HpcoptError):
    """Bad job config, command line, or run directory state. Exit 2."""

    exit_code = 2


class DataError(HpcoptError):
    """A data or checkpoint file that is missing, malformed or corrupt. Exit 3."""

    exit_code = 3


class NonFiniteError(HpcoptError):
    """Training produced a non-finite gradient and `optimizer.on_nonfinite = "stop"`. Exit 4."""

    exit_code = 4
