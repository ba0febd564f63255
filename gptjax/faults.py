"""Surviving interruption: SIGTERM/SIGINT finish the step and checkpoint; unwritable out_dir fails early."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a polite request the training loop checks between
    steps (it then checkpoints and exits). A second SIGINT raises KeyboardInterrupt at once; the
    last complete checkpoint is safe either way because orbax only renames finished ones."""

    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "request") -> None:
        self.signal_name = name

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled on the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def check_writable(out_dir: str | os.PathLike, min_free_bytes: int = 16 << 20) -> None:
    """Fail before training starts when out_dir cannot take a checkpoint."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"out_dir {path} is not writable ({err.strerror}); pass --out_dir=DIR "
                              "to a directory you can write") from None
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    if free < min_free_bytes:
        raise OSError(f"out_dir {path} has only {free >> 20} MiB free; free some space or pass "
                      "--out_dir=DIR on another disk")
