"""Latency is timed alone: one timing section at a time on a machine.

Trials running side by side on one node would otherwise time their models while another
trial's timing (or a dense base's) competes for the same cores and memory bandwidth. Every
timing section takes an exclusive `flock` on one file in the machine's temp folder, so
trials in different processes (Ray actors, nodes started on one machine, a `--remeasure`)
take turns; the lock goes with the process if it dies. The time spent waiting is recorded
next to the figure, and so are the section's bounds (wall clock), so overlaps can be checked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "prunefuse-timing.lock"


@dataclass
class Slot:
    wait_s: float = 0.0      # how long this section waited for the lock
    start: float = 0.0       # time.time() when it got the lock
    end: float = 0.0         # time.time() when it gave it back

    def facts(self) -> dict:
        return {"lock_wait_s": self.wait_s, "timed_from": self.start, "timed_to": self.end}


def lock_path() -> Path:
    """The machine-wide lock file (PRUNEFUSE_LOCK_DIR, else the temp folder)."""
    return Path(os.environ.get("PRUNEFUSE_LOCK_DIR") or tempfile.gettempdir()) / LOCK_NAME


@contextlib.contextmanager
def timed_alone():
    """Hold the machine's timing lock for the block; yields a Slot filled in as it goes."""
    slot = Slot()
    asked = time.perf_counter()
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        slot.wait_s = time.perf_counter() - asked
        slot.start = time.time()
        try:
            yield slot
        finally:
            slot.end = time.time()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
