"""The timed section of an evaluation has the machine to itself; everything else runs side by side.

Every workflow job (``scripts/run_stage.py``) holds a shared lock on one lock file of this machine while it runs.
The timed section of an evaluation (:func:`bitsweep.evaluate.measure_speed`) takes that lock exclusively: it waits
until the jobs already running here have ended, and new jobs wait at their start until it is done. Snakemake's
``timing`` resource only keeps evaluations apart; a quantization or conversion started beside a timed
generation on a workstation with cores to spare would slow it unseen.

A second lock, the turnstile, gives the timed section priority: a job takes its shared lock only by passing
through the turnstile, and a waiting timer holds the turnstile, so a stream of short jobs cannot starve it.
flock(2) locks live in one machine's kernel and the files lie in its /tmp: on a cluster each node has its own.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# This process's shared lock while it runs a job (an open descriptor: flock(2) locks belong to the open file, so
# the timed section must convert this very descriptor, not open a second one that would wait for the first).
_job_lock: dict[str, int] = {}


def lock_path(name: str) -> Path:
    folder = Path(os.environ.get("BITSWEEP_LOCK_DIR", "/tmp"))
    return folder / f"bitsweep-{os.getuid()}-{name}.lock"


def _open(name: str) -> int:
    return os.open(lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def job() -> Iterator[None]:
    """Held for the length of a workflow job: shared with every other job, excluded by a timed section."""
    if "fd" in _job_lock:  # already inside a job
        yield
        return
    turnstile, work = _open("turnstile"), _open("work")
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # waits while a timed section waits or runs
        fcntl.flock(work, fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        _job_lock["fd"] = work
        yield
    finally:
        _job_lock.pop("fd", None)
        os.close(work)  # closing releases
        os.close(turnstile)


@contextmanager
def alone() -> Iterator[dict[str, float]]:
    """The machine to this process: waits for the other jobs to end and holds new ones at their start. Yields
    ``{"speed_wait_seconds": ...}``, how long it waited."""
    work = _job_lock.get("fd")
    own = work is None
    if own:
        work = _open("work")
    turnstile = _open("turnstile")
    started = time.perf_counter()
    try:
        # Our own shared lock goes first: two timers that each kept theirs would wait for each other.
        fcntl.flock(work, fcntl.LOCK_UN)
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(work, fcntl.LOCK_EX)
        yield {"speed_wait_seconds": time.perf_counter() - started}
    finally:
        if own:
            os.close(work)
        else:
            fcntl.flock(work, fcntl.LOCK_SH)  # a plain job again (taken while we still hold the turnstile)
        os.close(turnstile)
