"""One writer per experiment: a search or a resume holds an exclusive lock on its folder.

The lock is `fcntl.flock` on EXPERIMENT/.prunefuse.lock, taken without waiting. The kernel
drops it when its holder dies, however it dies, so a dead driver's lock is stale by
construction and the next `--resume` simply takes it; the file keeps who holds it (pid,
host, since) only to name them in the refusal. A URI storage (s3://, gs://) has no such
lock: one driver per experiment there is the user's to keep.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from spaces.errors import PrunefuseError

LOCK_FILE = ".prunefuse.lock"


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def claimed(folder, *, what: str = "experiment"):
    """Hold `folder` (created if missing) for the duration; refuses at once if another holds it.
    A folder this claim created is removed again if the body fails while it holds nothing but
    the lock file (a search that stopped before writing anything leaves nothing)."""
    folder = Path(folder)
    created = not folder.exists()
    # The folders this claim makes (the storage too, where it is new): removed again with it.
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrunefuseError(f"{what} {str(folder)!r} is being written by another search ({_holder(fd)}); "
                                 f"wait for it to finish, or stop it and --resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        try:
            yield
        except BaseException:
            if created and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
                lock.unlink(missing_ok=True)
                for made_folder in made:  # innermost first; one that holds anything else stays
                    with contextlib.suppress(OSError):
                        made_folder.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock
