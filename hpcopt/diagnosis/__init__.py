"""Diagnosis of stalled, mismatched and crashed ranks (docs/diagnosis.md): a stalled or mismatched rank
is named, not waited on.

    recorder.py     the flight recorder: the last 64 MPI calls of this rank in a fixed binary ring (an
                    mmap, file-backed during training), dumped into stall reports and crash files; the
                    crash sentinel that turns a rank killed by SIGSEGV into hpcopt-crash-<rank>.txt
    fingerprint.py  Traced: the communicators of a Grid, recording every call and keeping a fingerprint
                    of every collective, compared at the checkpoint agreements, on a hang and on an MPI
                    error (run.check_collectives)
    watchdog.py     a thread per rank: a step that does not complete within run.stall_timeout_s gives a
                    report naming every rank's position (and the ones that cannot answer), then exit 76

Nothing heavy here: the CLI reads the exit codes without loading numpy or MPI.
"""

EXIT_STALL = 76      # no step completed within run.stall_timeout_s (run.on_stall = "abort")
EXIT_MISMATCH = 77   # the ranks of a communicator called different collectives (run.check_collectives)


def ranges(nums) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (rank and core lists in reports and `hpcopt doctor`)."""
    nums = sorted(set(nums))
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)
