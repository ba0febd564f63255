"""A local Google Cloud Storage for the gs:// tests: gcp-storage-emulator started on 127.0.0.1 on a
free port in a subprocess, and the environment that points gcsfs (STORAGE_EMULATOR_HOST, an anonymous
token) and TensorStore (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING) at it. Nothing may
look up real credentials or the metadata server: those variables point at a closed local port, the
credential files at an empty directory, and gcs_guard/sitecustomize.py refuses (and records) any
connection a Python library opens to another address, in this process and in every child."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

GUARD = Path(__file__).resolve().with_name("gcs_guard")
BUCKET = "bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, workdir: Path):
        self.port, closed = free_port(), free_port()  # nothing listens on `closed`
        self.url = f"http://127.0.0.1:{self.port}"
        self.connect_log = workdir / "non-local-connections.log"
        self.connect_log.write_text("")
        (workdir / "gcloud").mkdir(exist_ok=True)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url, "FSSPEC_GCS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": f"127.0.0.1:{closed}",
            "GCE_METADATA_IP": f"127.0.0.1:{closed}", "GCE_METADATA_ROOT": f"127.0.0.1:{closed}",
            "CLOUDSDK_CONFIG": str(workdir / "gcloud"), "GOOGLE_CLOUD_PROJECT": "test",
            # gcsfs's default file system asks a gRPC control API for the bucket's layout, which the
            # emulator does not serve: the plain JSON-API one talks only to STORAGE_EMULATOR_HOST
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GPTJAX_TEST_CONNECT_LOG": str(self.connect_log),
        }
        log = open(workdir / "emulator.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_gcs_emulator.py")), "start", "--host", "127.0.0.1", "--port",
             str(self.port), "--in-memory", "--default-bucket", BUCKET, "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, env=self.child_env({}), start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.read() == b"OK":
                        break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator did not start: {(workdir / 'emulator.log').read_text()}")
                time.sleep(0.1)

    def child_env(self, base: dict) -> dict:
        env = {k: v for k, v in {**os.environ, **base}.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD), env.get("PYTHONPATH", "")]))
        return env

    def install_here(self, monkeypatch) -> None:
        """This process's environment as the children's, and the connection guard in it."""
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        import fsspec.config

        monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        sys.path.insert(0, str(GUARD))
        try:
            importlib.import_module("sitecustomize")  # the guard: installs its audit hook on import
        finally:
            sys.path.remove(str(GUARD))

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the objects under `prefix` in the bucket, read from the emulator's JSON API
        directly (neither gcsfs nor TensorStore)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(url, timeout=30) as r:
                listing = json.loads(r.read())
            names += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return names

    def non_local_connections(self) -> str:
        return self.connect_log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
