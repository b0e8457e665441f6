"""Run a command and stream its output, line by line, to a callback; credentials never get through.

Progress bars (lines ended by a carriage return) are passed on at most every `progress_every` seconds
and once at their end, so a log shows progress without thousands of lines.

Redaction covers the `user:password@` part of any URL, the values of environment variables whose
names look secret (KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, ...), and any value handed in explicitly
(e.g. those read from Prefect Secret blocks).
"""

from __future__ import annotations

import codecs
import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MASK = "***"
URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@:]+(?::[^\s/@]*)?@")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|SESSION|PRIVATE", re.IGNORECASE)
NOT_SECRET_NAMES = {"PREFECT_API_URL", "PREFECT_HOME", "SSH_AUTH_SOCK", "GPG_AGENT_INFO", "XDG_SESSION_TYPE",
                    "XDG_SESSION_ID", "XDG_SESSION_CLASS", "XDG_SESSION_DESKTOP", "DESKTOP_SESSION"}
MIN_SECRET_CHARS = 4  # shorter values (e.g. "1") would mask ordinary text


class Redactor:
    """Masks credentials in text: URL user info, and the given secret values wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = {value for value in secrets if value and len(value) >= MIN_SECRET_CHARS}
        self._values = sorted(values, key=len, reverse=True)  # longest first: no partial masks left

    def __call__(self, text: str) -> str:
        text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
        for value in self._values:
            text = text.replace(value, MASK)
        return text

    def extended(self, secrets: Iterable[str]) -> Redactor:
        return Redactor([*self._values, *secrets])


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values of variables whose names look like credentials (AWS_SECRET_ACCESS_KEY, *_TOKEN, ...)."""
    return [value for name, value in env.items()
            if SECRET_NAME.search(name) and name not in NOT_SECRET_NAMES and value]


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for stage commands: this one, this interpreter's bin folder first on PATH (so DVC
    finds `vlkd` without an activated venv), unbuffered Python output, plus `extra`."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


@dataclass
class Completed:
    returncode: int
    lines: list[str] = field(default_factory=list)  # every (redacted) line, progress updates excluded
    seconds: float = 0.0

    def tail(self, count: int = 20) -> list[str]:
        return self.lines[-count:]


def stream(command: Sequence[str], cwd: Path, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
           redact: Redactor | None = None, progress_every: float = 10.0, keep: int = 2000) -> Completed:
    """Run `command` in `cwd` (stdout and stderr together), call `on_line` for each redacted line as it
    comes, and return the exit code and the last `keep` lines."""
    redact = redact or Redactor()
    started = time.monotonic()
    lines: collections.deque[str] = collections.deque(maxlen=keep)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    process = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)  # its own process group: stopped as a whole
    pending = ""
    last_progress = 0.0
    progress = ""

    def emit(text: str) -> None:
        text = redact(text.rstrip())
        if text.strip():
            lines.append(text)
            on_line(text)

    try:
        while chunk := os.read(process.stdout.fileno(), 65536):
            pending += decoder.decode(chunk)
            while True:
                cut = min((i for i in (pending.find("\n"), pending.find("\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                piece, ending, pending = pending[:cut], pending[cut], pending[cut + 1:]
                if ending == "\r":  # a progress bar redrawing itself
                    progress = piece
                    now = time.monotonic()
                    if now - last_progress >= progress_every and piece.strip():
                        last_progress = now
                        on_line(redact(piece.strip()))
                    continue
                if progress and not piece.strip():
                    continue
                progress = ""
                emit(piece)
        pending += decoder.decode(b"", final=True)
        if pending:
            emit(pending)
        returncode = process.wait()
    except BaseException:  # interrupted or cancelled: stop the command and everything it started
        _stop_group(process)
        raise
    finally:
        process.stdout.close()
    return Completed(returncode, list(lines), round(time.monotonic() - started, 3))


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
