"""Where runs, data and weights live: a local path, or a `gs://bucket/path` URL on Google Cloud Storage.

`resolve` turns either into a pathlib-like object: `pathlib.Path` locally, `etils.epath.Path` on a
bucket (fsspec's gcsfs underneath, the filesystem orbax's own small files go through; TensorStore
writes the checkpoint arrays to the bucket itself). Every module opens out_dir, data_dir and the
weights it is given through here, so a URL is never taken for a local directory named after it.

A bucket differs from a disk in three ways the callers rely on: an object is written in one piece
(a reader sees the old object or the whole new one, so no temp-file-and-rename is needed, and
there is none: GCS has no rename), nothing can be appended to (`WorkingCopy`), and nothing can be
memory-mapped (`local_copy` keeps a verified copy of train.bin/val.bin on the host's disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Iterator

SCHEMES = ("gs",)  # gs://bucket/path: Google Cloud Storage
INSTALL = "pip install 'gptjax[gcs]' (gcsfs)"
# scheme:/... is a URL whatever the scheme; a bare colon only after a storage scheme (gs:bucket is a
# typo, run:2 a local name)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/|^(gs|gcs|s3|s3a|s3n|hdfs|az|abfs|abfss|wasb|http|https|ftp|file|hf):",
                  re.IGNORECASE)
_GS = re.compile(r"^gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/|$)")
CHUNK = 16 << 20  # bytes per ranged read of a download


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a scheme (gs://, s3://, a typo like gs:/ or gs:bucket) rather than a file."""
    match = _URL.match(str(path))
    return match is not None and len(match.group(1) or match.group(2)) > 1  # one letter: a Windows drive, C:/...


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith("gs://")


def problem(path: str | os.PathLike, what: str) -> str | None:
    """Why `path` cannot be used as `what` (an unsupported scheme, a malformed gs:// URL, gcsfs not
    installed), or None. Checks the text only: nothing is contacted."""
    text = str(path)
    if not is_url(text):
        return None
    if not text.startswith("gs://"):
        return (f"{what}={text!r} is not a local path or a gs:// URL: the storage gptjax reads and writes is "
                "local (or shared) directories and Google Cloud Storage, as gs://BUCKET/PATH")
    if not _GS.match(text):
        return f"{what}={text!r} is not a valid gs:// URL: write gs://BUCKET/PATH with a bucket name"
    if importlib.util.find_spec("gcsfs") is None:
        return f"{what}={text!r} is on Google Cloud Storage, which needs gcsfs: {INSTALL}"
    return None


def resolve(path: str | os.PathLike, what: str = "path"):
    """`path` as a pathlib-like object (see the module docstring); ValueError or ImportError for a
    URL that cannot be served."""
    if isinstance(path, Path) or not is_url(path):
        return Path(path)
    if (why := problem(path, what)) is not None:
        raise (ImportError if "needs gcsfs" in why else ValueError)(why)
    import fsspec.config
    from etils import epath

    # gcsfs keeps directory listings for the life of the process unless told not to: a process that
    # looks at a run while another writes it (a notebook, a poller) would never see the new checkpoints
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

    return epath.Path(str(path).rstrip("/"))


def absolute(path: str | os.PathLike):
    """`resolve(path)`, made absolute when local (a bucket URL is absolute already)."""
    resolved = resolve(path)
    return resolved.absolute() if isinstance(resolved, Path) else resolved


def write_bytes(path, payload: bytes) -> None:
    """Write `payload` so a crash never leaves a truncated file: locally through a temporary file
    renamed over `path`; on a bucket in the one upload that creates the object."""
    path = resolve(path)
    if not isinstance(path, Path):
        path.write_bytes(payload)
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def check_writable(url: str) -> None:
    """Fail before training when the bucket cannot be written: write and delete a probe object, so
    missing credentials, a missing bucket or no network fail now, in one line, not at the first save."""
    probe = resolve(url) / f".gptjax-write-test-{uuid.uuid4().hex}"
    gcsfs_log = logging.getLogger("gcsfs")
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)  # it logs each failed request with a traceback; the error below says it
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as err:  # gcsfs and google-auth raise their own types (HttpError, RefreshError, ...)
        raise PermissionError(
            f"cannot write to {url} ({type(err).__name__}: {_first_line(err)}): check that the bucket exists and "
            "that this machine's credentials may write to it (a TPU/GCE VM's service account, or "
            "`gcloud auth application-default login`)") from None
    finally:
        gcsfs_log.setLevel(level)


def _first_line(err: BaseException) -> str:
    from gptjax.faults import first_line

    return first_line(err)


def cache_root() -> Path:
    """gptjax's cache on this host (copies of bucket data, compiled programs): $GPTJAX_CACHE_DIR,
    else $XDG_CACHE_HOME/gptjax, else ~/.cache/gptjax."""
    if os.environ.get("GPTJAX_CACHE_DIR"):
        return Path(os.environ["GPTJAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptjax"


def cache_records(name: str, remedy: str) -> dict:
    """The records (a JSON object) kept in cache_root()/name, {} if there are none. An unreadable
    file is a lost cache, not an error: a warning says so, with `remedy` (how it is rebuilt)."""
    path = cache_root() / name
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring {path} ({err}); delete it and {remedy}")
        return {}


def record_in_cache(name: str, key: str, value) -> None:
    """Set `key` to `value` among the records of cache_root()/name, rewritten whole and atomically:
    a reader sees the old records or the new ones. An unreadable file is replaced."""
    path = cache_root() / name
    records = _read_json(path)  # None when missing or unreadable
    records = {**records, key: value} if isinstance(records, dict) else {key: value}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, json.dumps(records, indent=1, sort_keys=True).encode())


def local_copy(url: str, what: str = "file") -> Path:
    """A local copy of the bucket object `url`, downloaded once per host into
    cache_root()/gcs/BUCKET/PATH and reused while the object's size and generation are unchanged.
    The download goes to PATH.part in ranged reads, resumed where an interrupted one stopped, then
    is checked for size and renamed; an flock keeps several processes of one host to one download."""
    import fsspec
    from tqdm.auto import tqdm

    fs = fsspec.filesystem("gs")
    try:
        info = fs.info(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found") from None
    size, generation = int(info["size"]), str(info.get("generation") or info.get("md5Hash") or "")
    dest = cache_root() / "gcs" / url[len("gs://"):]
    source = {"url": url, "size": size, "generation": generation}
    marker, part = dest.with_name(dest.name + ".source.json"), dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file() and dest.stat().st_size == size and _read_json(marker) == source:
            return dest
        if _read_json(marker) != source:  # a partial download of another version of the object
            part.unlink(missing_ok=True)
            dest.unlink(missing_ok=True)
            marker.write_text(json.dumps(source))
        done = part.stat().st_size if part.is_file() else 0
        print(f"copying {url} ({size / 2**20:.1f} MiB) to {dest}" + (f", resuming at {done / 2**20:.1f} MiB"
              if done else ""), file=sys.stderr)
        with fs.open(url, "rb", block_size=CHUNK) as src, open(part, "ab") as out, \
                tqdm(total=size, initial=done, unit="B", unit_scale=True, desc=what, file=sys.stderr,
                     mininterval=1.0) as bar:
            src.seek(done)
            while done < size:
                chunk = src.read(min(CHUNK, size - done))
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        if part.stat().st_size != size:
            raise OSError(f"copying {url} to {part} stopped at {part.stat().st_size} of {size} bytes: "
                          "run again to resume the copy")
        os.replace(part, dest)
    return dest


def local_tree(url: str) -> Path:
    """A local copy (local_copy) of the bucket object `url`, or of the objects directly in the
    "directory" `url` (a Hugging Face directory, a nanoGPT out_dir), for readers of local files."""
    remote = resolve(url)
    if not remote.is_dir():
        return local_copy(url, remote.name)
    for item in remote.iterdir():
        if not item.is_dir():
            local_copy(str(item), item.name)
    return cache_root() / "gcs" / url[len("gs://"):].rstrip("/")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def upload(local: Path, remote) -> None:
    """Replace the bucket object `remote` with the local file's contents; OSError naming it on failure."""
    try:
        remote.write_bytes(local.read_bytes())
    except Exception as err:  # gcsfs's HttpError, aiohttp's connection errors, ...
        raise OSError(f"could not upload {remote} ({type(err).__name__}: {_first_line(err)})") from err


class WorkingCopy:
    """A local file standing in for a bucket object that is appended to (metrics.jsonl): it starts
    as the object's contents, takes the appends, and `upload` replaces the object with it whole."""

    def __init__(self, remote):
        self.remote = remote
        fd, name = tempfile.mkstemp(prefix="gptjax-", suffix=f"-{remote.name}")
        os.close(fd)
        self.local = Path(name)
        if remote.exists():
            self.local.write_bytes(remote.read_bytes())

    def upload(self) -> None:
        upload(self.local, self.remote)

    def close(self) -> None:
        try:
            self.upload()
        finally:
            self.local.unlink(missing_ok=True)


class DirectoryCopy:
    """A local directory standing in for a bucket directory whose files are appended to (TensorBoard's
    event files): `upload` copies each file that changed since the last upload to the bucket whole."""

    def __init__(self, remote):
        self.remote = remote
        self.local = Path(tempfile.mkdtemp(prefix=f"gptjax-{remote.name}-"))
        self._uploaded: dict[str, int] = {}  # file name -> size at its last upload

    def upload(self) -> None:
        for file in sorted(self.local.iterdir()):
            size = file.stat().st_size
            if self._uploaded.get(file.name) == size:
                continue
            upload(file, self.remote / file.name)
            self._uploaded[file.name] = size

    def close(self) -> None:
        try:
            self.upload()
        finally:
            shutil.rmtree(self.local)


@contextlib.contextmanager
def staged(dest) -> Iterator[Path]:
    """A directory to write `dest`'s files into: `dest` itself when local; on a bucket a temporary
    directory whose files are uploaded to `dest` once the block succeeds (OSError naming the object
    that failed)."""
    dest = resolve(dest)
    if isinstance(dest, Path):
        yield dest
        return
    local = Path(tempfile.mkdtemp(prefix="gptjax-stage-"))
    try:
        yield local
        for file in sorted(local.rglob("*")):
            if file.is_file():
                upload(file, dest / str(file.relative_to(local)))
    finally:
        shutil.rmtree(local)
