"""bitsweep.quiet: a timed section runs with no other workflow job on the machine, without starving or deadlocking.

Real processes on real flock(2) locks (a folder of this test's own); each side records when it held what, and the
test checks the order of those moments, not how long anything took.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from bitsweep import quiet

CTX = mp.get_context("fork")


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSWEEP_LOCK_DIR", str(tmp_path))


def a_job(log, name: str, hold: float) -> None:
    with quiet.job():
        log.put((name, "start", time.monotonic()))
        time.sleep(hold)
        log.put((name, "end", time.monotonic()))


def a_timer(log, name: str, in_job: bool, together=None) -> None:
    def timed():
        if together is not None:  # every timer is inside its job before any asks for the machine
            together.wait(timeout=10)
        with quiet.alone():
            log.put((name, "start", time.monotonic()))
            time.sleep(0.3)
            log.put((name, "end", time.monotonic()))

    if in_job:  # an evaluation: a job whose timed section converts its own shared lock
        with quiet.job():
            timed()
    else:
        timed()


def run(*targets) -> dict[tuple[str, str], float]:
    log = CTX.Queue()
    procs = []
    for target, args, delay in targets:
        proc = CTX.Process(target=target, args=(log, *args))
        proc.start()
        procs.append(proc)
        time.sleep(delay)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0, "a process hung or failed (deadlock?)"
    events = {}
    while not log.empty():
        name, what, at = log.get()
        events[name, what] = at
    return events


def test_a_timed_section_waits_for_running_jobs_and_new_jobs_wait_for_it():
    events = run(
        (a_job, ("quantize", 1.0), 0.3),  # running when the timer arrives
        (a_timer, ("evaluate", True), 0.3),  # waits for quantize; holds the turnstile meanwhile
        (a_job, ("convert", 0.1), 0.0),  # arrives while the timer waits: must not jump the queue
    )
    assert events["quantize", "end"] <= events["evaluate", "start"]
    assert events["evaluate", "end"] <= events["convert", "start"]


def test_two_timed_sections_inside_jobs_take_turns_without_deadlock():
    together = CTX.Barrier(2)
    events = run((a_timer, ("a", True, together), 0.0), (a_timer, ("b", True, together), 0.0))
    first, second = sorted(("a", "b"), key=lambda n: events[n, "start"])
    assert events[first, "end"] <= events[second, "start"]


def test_jobs_share_the_machine_and_a_timer_outside_the_workflow_still_waits():
    events = run(
        (a_job, ("one", 0.8), 0.1),
        (a_job, ("two", 0.8), 0.1),
        (a_timer, ("bench", False), 0.0),
    )
    assert events["two", "start"] < events["one", "end"]  # shared: both ran at once
    assert max(events["one", "end"], events["two", "end"]) <= events["bench", "start"]
