"""One pipeline run per workspace at a time.

An exclusive `fcntl.flock` on `<project>/.vlkd.lock`, held for a whole run (stages, push, promotion).
A second run waits up to `timeout` seconds, then stops with one line naming the holder; it never
touches the workspace before it holds the lock. The kernel drops the lock when the holder dies, so a
killed run never leaves a stale lock behind (the file's contents are only a note of who held it last).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from vlkd.errors import VlkdError

LOCK_NAME = ".vlkd.lock"
POLL_SECONDS = 0.2


class WorkspaceLock:
    """`with WorkspaceLock(project, timeout=60, owner="flow run x"):` runs the block as the only run."""

    def __init__(self, project: Path, timeout: float = 0.0, owner: str = "vlkd pipeline") -> None:
        self.path = Path(project) / LOCK_NAME
        self.timeout = timeout
        self.owner = owner
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = describe_holder(self.path)
                    file.close()
                    raise VlkdError(
                        f"another pipeline run holds {self.path} ({holder}); waited {self.timeout:g} s. Wait for "
                        "it to finish and run again, or raise pipeline.lock_timeout to wait longer"
                    ) from None
                time.sleep(POLL_SECONDS)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                               "started": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkspaceLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(path: Path) -> str:
    """'pid N on host H, <owner>, started at T' from the lock file, as far as it can be read."""
    try:
        note = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        note = {}
    if not note:
        return "holder unknown"
    return (f"pid {note.get('pid', '?')} on {note.get('host', '?')}, {note.get('owner', '?')}, "
            f"started at {note.get('started', '?')}")
