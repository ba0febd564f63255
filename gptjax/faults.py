"""Surviving interruption: SIGTERM/SIGINT finish the step and checkpoint, a second Ctrl-C leaves at
once, and an unwritable out_dir fails before training starts.

Why a hard exit is safe: orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp*` and
renames it to `<step>` only once every file is written, then deletes older steps. Dying at any
moment (kill -9, os._exit) therefore leaves the previous complete checkpoint in place, and the
leftover temporary directory is ignored by `latest_step` and replaced when that step is saved again.
On a bucket, where a step is written in place, the step without orbax's commit_success.txt is that
leftover.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

from gptjax import paths

EXIT_INTERRUPTED = 130  # the shell's code for "killed by SIGINT"


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a polite request the training loop checks between
    steps (it then checkpoints and exits). A second SIGINT raises KeyboardInterrupt at once; the
    CLI then leaves without waiting for a save in flight (see `exit_now`). Repeated SIGTERMs are
    ignored: schedulers send one and follow it with SIGKILL, which is safe too."""

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
        if self.requested:
            return
        self.signal_name = signal.Signals(signum).name
        # os.write, not print: the handler may run while the main thread is inside a print
        _write_stderr(f"\n{self.signal_name} received: finishing the current step and saving a checkpoint "
                      "(press Ctrl-C again to exit at once)\n")

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


def _write_stderr(text: str) -> None:
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):  # stderr closed or not a real file (e.g. captured): say nothing
        return


def exit_now(out_dir: str | os.PathLike | None, code: int = EXIT_INTERRUPTED) -> NoReturn:
    """Leave the process immediately after an interrupt, saying which checkpoint a resume will use.

    os._exit, because a normal exit joins orbax's non-daemon finalize thread, i.e. waits for the
    save in flight; abandoning that save is exactly as safe as a kill -9 (see the module docstring)."""
    from gptjax.checkpoint import checkpoint_dir, complete_steps

    where = ""
    if out_dir is not None:
        steps = complete_steps(checkpoint_dir(out_dir))
        where = (f" The newest complete checkpoint, step {steps[-1]} in {checkpoint_dir(out_dir)}, is intact: "
                 "resume with --init_from=resume" if steps else " No checkpoint had been completed yet")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe must not block the exit
            stream.flush()
    _write_stderr(f"\nerror: interrupted: exiting at once without waiting for a checkpoint save.{where}\n")
    os._exit(code)


class OutDirLock:
    """The one writer of an out_dir: an flock on OUT_DIR/.gptjax-lock, held while the run lives. The
    kernel drops it when its process dies, however it dies (kill -9 and power loss included), so the
    file a killed run leaves behind is stale by construction and the next run simply takes it over;
    its text (pid, host, start time) names the holder when another run is refused. Readers (sample,
    export, plot, crosscheck) take no lock. Re-entrant within a process, which is one user (a notebook
    that sets a run up again). On NFS, Linux emulates flock with POSIX locks through the lock daemon.
    A gs:// out_dir is not locked: a bucket has no lock that its holder's death releases (a lock
    object would outlive a kill -9 and refuse every resume until removed by hand), so one writer
    per bucket path is the user's to keep (docs/reliability.md)."""

    NAME = ".gptjax-lock"
    _held: dict[str, list] = {}  # resolved path -> [fd, holders] of this process

    def __init__(self, out_dir: str | os.PathLike):
        self._key: str | None = None
        if paths.is_remote(out_dir):
            self.path = None
            return
        self.path = Path(out_dir).absolute() / self.NAME
        key = str(self.path.resolve())
        if key in self._held:
            self._held[key][1] += 1
        else:
            self._held[key] = [self._take(), 1]
        self._key = key

    def _take(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said which"
            os.close(fd)
            raise OSError(f"out_dir {self.path.parent} is being written by another run ({holder}): wait for it "
                          "to finish or stop it, or pass another --out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        return fd

    def release(self) -> None:
        """Give this holder's share back (once; later calls do nothing)."""
        key, self._key = self._key, None
        entry = self._held.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            os.close(entry[0])  # closing the last descriptor drops the flock


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's first line for a one-line message, its type's name if it has none. Storage errors
    put the cause ("No space left on device") last, after long paths: a long line keeps both ends."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else f"{text[:limit // 3]} ... {text[-(2 * limit) // 3:]}"


def check_writable(out_dir: str | os.PathLike, min_free_bytes: int = 16 << 20) -> None:
    """Fail before training starts when out_dir cannot take a checkpoint."""
    if paths.is_remote(out_dir):
        paths.check_writable(str(out_dir))
        return
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"out_dir {path} is not writable ({err.strerror or err}); pass --out_dir=DIR "
                              "to a directory you can write") from None
    check_free_space(path, min_free_bytes)


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int) -> None:
    """Fail before training when out_dir cannot hold one more checkpoint of `needed_bytes` (a new
    checkpoint is written in full before the oldest one is deleted). A bucket has no such limit."""
    if paths.is_remote(out_dir):
        return
    stat = os.statvfs(out_dir)
    free = stat.f_bavail * stat.f_frsize
    if free < needed_bytes:
        raise OSError(f"out_dir {out_dir} has only {free / 2**20:.0f} MiB free but a checkpoint needs about "
                      f"{needed_bytes / 2**20:.0f} MiB; free some space or pass --out_dir=DIR on another disk")


def state_nbytes(state) -> int:
    """Bytes of every array in a train state (arrays or their ShapeDtypeStructs): what one
    checkpoint of it takes on disk, about."""
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
