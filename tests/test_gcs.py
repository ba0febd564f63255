"""Runs, data and weights on Google Cloud Storage, against a local emulator (tests/_gcs.py): nothing
leaves 127.0.0.1. A run trains into gs://bucket/run from a gs:// data_dir, is killed with SIGKILL
after its first checkpoint, resumes from the bucket and logs the losses of an uninterrupted local
run bit for bit; sample, export and plot read the bucket; two processes write one checkpoint there.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from _gcs import BUCKET, Emulator, free_port
from gptjax import checkpoint, config, crosscheck, data, export, paths, plot, prepare, sample, train, weights

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WORKER = ROOT / "tests" / "faults" / "_fault_worker.py"  # python -m gptjax.train, the FLOP/s probe skipped
TIMEOUT = 300
N = 4  # iterations; a checkpoint after every one
RUN = dict(dataset="shakespeare_char", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
           gradient_accumulation_steps=1, dropout=0.1, eval_interval=1, eval_iters=2, log_interval=1,
           keep_checkpoints=100, learning_rate=1e-3, warmup_iters=2, lr_decay_iters=40, min_lr=1e-4,
           max_iters=N, seed=7)
RUN_URL, DATA_URL = f"gs://{BUCKET}/run", f"gs://{BUCKET}/data"

pytestmark = [pytest.mark.skipif(not CORPUS.is_file(), reason=f"{CORPUS} absent"),
              pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("gcsfs", "gcp_storage_emulator")),
                                 reason="the gcs test dependencies are not installed: pip install -e '.[test]'")]


def _args(out_dir, data_dir, **overrides):
    return [f"--{k}={v}" for k, v in {**RUN, "out_dir": out_dir, "data_dir": data_dir, **overrides}.items()]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, a local dataset and its copy in the bucket, and a way to start train children."""
    root = tmp_path_factory.mktemp("gcs")
    emulator = Emulator(root)
    prepare.prepare_shakespeare_char(CORPUS.read_text()[:20000], root / "data")
    env = emulator.child_env({"GPTJAX_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                              "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                              "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                              "GPTJAX_CACHE_DIR": str(root / "cache")})
    env.pop("XLA_FLAGS", None)
    children = []

    class Space:
        dir, data = root, root / "data"

        def start(self, name, argv, extra_env=None, worker_options=()):
            with open(root / f"{name}.log", "w") as log:
                children.append(subprocess.Popen([sys.executable, str(WORKER), *worker_options, "--", *argv], cwd=root,
                                                 env={**env, **(extra_env or {})}, stdout=log,
                                                 stderr=subprocess.STDOUT))
            return children[-1]

        def wait(self, proc, name):
            assert proc.wait(timeout=TIMEOUT) == 0, (root / f"{name}.log").read_text()[-3000:]

    try:
        yield emulator, Space()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
        emulator.stop()


@pytest.fixture
def here(gcs, monkeypatch, tmp_path):
    """This process pointed at the emulator, working in an empty directory that must stay empty of
    anything named after a URL."""
    emulator, space = gcs
    emulator.install_here(monkeypatch)
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(space.dir / "cache"))
    monkeypatch.chdir(tmp_path)
    yield emulator, space
    assert not [p for p in tmp_path.rglob("*") if "gs:" in p.name or p.name == BUCKET], list(tmp_path.rglob("*"))
    assert emulator.non_local_connections() == ""


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _params(out_dir) -> dict:
    flat = checkpoint.load_inference(out_dir)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(flat)[0]}


@pytest.mark.parametrize("url", ["s3://bucket/run", "hdfs://namenode/run", "gs:/bucket/run", "gs:bucket/run",
                                 "gs://", "https://example.com/run"])
def test_unsupported_urls_are_refused_in_one_line(url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key in ("out_dir", "data_dir", "init_from"):
        assert train.main([f"--{key}={url}", "--max_iters=1"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"{key}={url!r}" in lines[0] and "gs://" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no local directory named after the URL


def test_local_names_with_a_colon_are_paths():
    assert not any(paths.is_url(p) for p in ("run:2", "out/gs://x", "C:/runs", "./gs:/bucket"))
    assert all(paths.is_url(p) for p in ("gs://b/r", "GS://b/r", "gs:b/r", "s3:b", "file:///tmp/x", "x-y://z"))
    assert isinstance(paths.resolve("run:2"), Path) and paths.problem("run:2", "out_dir") is None


def test_prepare_refuses_a_bucket_and_says_how_to_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["shakespeare_char", "--input", str(CORPUS), "--out", "gs://bucket/data"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gcloud storage cp DIR/* gs://bucket/data/" in err, err
    assert list(tmp_path.iterdir()) == []


def test_without_gcsfs_a_gs_url_says_what_to_install(monkeypatch):
    real = paths.importlib.util.find_spec
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(ValueError, match=r"out_dir='gs://bucket/run' is on Google Cloud Storage, which needs gcsfs: "
                                         r"pip install 'gptjax\[gcs\]'"):
        config.TrainConfig(out_dir="gs://bucket/run")
    with pytest.raises(ImportError, match="gcsfs"):
        paths.resolve("gs://bucket/run")


def test_gcsfs_and_tensorstore_write_to_the_emulator(here):
    emulator, _ = here
    with pytest.raises(ConnectionRefusedError, match="test guard"):  # the guard is on in this process
        socket.getaddrinfo("storage.googleapis.com", 443)
    assert "storage.googleapis.com" in emulator.non_local_connections()
    emulator.connect_log.write_text("")
    probe = paths.resolve(f"gs://{BUCKET}/probe/a.json")
    checkpoint.write_json(probe, {"x": 1})
    assert "probe/a.json" in emulator.objects("probe/")  # gcsfs, seen through the emulator's own API
    assert json.loads(probe.read_text()) == {"x": 1}
    ckpt = checkpoint.Checkpointer(f"gs://{BUCKET}/probe", writer=True)
    state = {"w": jax.numpy.arange(6.0).reshape(2, 3)}
    import orbax.checkpoint as ocp

    ckpt.manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave({})))
    ckpt.close()
    objects = emulator.objects("probe/checkpoints/3/")
    assert "probe/checkpoints/3/commit_success.txt" in objects
    assert any("/state/ocdbt.process_0/" in name for name in objects), objects  # TensorStore's array data
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(f"gs://{BUCKET}/probe")) == [3]
    # what a kill -9 mid-save leaves on a bucket: a later step's objects without commit_success.txt
    paths.resolve(f"gs://{BUCKET}/probe/checkpoints/5/state/_METADATA").write_bytes(b"{}")
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(f"gs://{BUCKET}/probe")) == [3]
    assert checkpoint.Checkpointer(f"gs://{BUCKET}/probe").latest_step() == 3


def test_bucket_data_is_copied_once_resumed_and_refreshed(here, capsys):
    emulator, space = here
    url, payload = f"gs://{BUCKET}/copy/train.bin", np.arange(300_000, dtype=np.uint16).tobytes()
    paths.resolve(url).write_bytes(payload)
    copy = paths.local_copy(url)
    assert copy == space.dir / "cache" / "gcs" / BUCKET / "copy" / "train.bin" and copy.read_bytes() == payload
    assert f"copying {url} (0.6 MiB) to {copy}" in capsys.readouterr().err
    assert paths.local_copy(url) == copy and "copying" not in capsys.readouterr().err  # reused
    part = copy.with_name("train.bin.part")  # a copy interrupted half-way
    copy.rename(part)
    with open(part, "r+b") as f:
        f.truncate(len(payload) // 2)
    assert paths.local_copy(url).read_bytes() == payload
    assert "resuming at 0.3 MiB" in capsys.readouterr().err and not part.exists()
    paths.resolve(url).write_bytes(payload[::-1])  # the object replaced: a new generation
    assert paths.local_copy(url).read_bytes() == payload[::-1]
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/copy/val.bin not found"):
        paths.local_copy(f"gs://{BUCKET}/copy/val.bin")


def test_missing_bucket_fails_before_training(here, capsys, compilations):
    _, space = here
    rc = train.main(_args("gs://no-such-bucket/run", str(space.data)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write to gs://no-such-bucket/run" in lines[0] and "credentials" in lines[0]
    assert compilations == []


def test_killed_bucket_run_resumes_bitwise_and_is_sampled_exported_plotted(here, capsys):
    emulator, space = here
    for name in ("train.bin", "val.bin", "meta.pkl"):  # the data_dir is on the bucket too
        paths.resolve(f"{DATA_URL}/{name}").write_bytes((space.data / name).read_bytes())
    local = space.dir / "local"
    space.wait(space.start("reference", _args(local, space.data)), "reference")  # first: it fills the compile cache
    # each wait for a save takes 3 s longer, so the poll below sees the first checkpoint long before
    # the last one lands, however fast the steps and saves are
    first = space.start("bucket", _args(RUN_URL, DATA_URL), worker_options=("--slow-wait", "3"))
    directory = checkpoint.checkpoint_dir(RUN_URL)
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.complete_steps(directory):
        assert first.poll() is None, (space.dir / "bucket.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in the bucket"
        time.sleep(0.05)
    first.kill()  # SIGKILL
    first.wait()
    kept = checkpoint.complete_steps(directory)
    assert kept and kept[-1] < N, kept
    space.wait(space.start("resume", _args(RUN_URL, DATA_URL, init_from="resume")), "resume")

    want = {(r["iter"], "loss" in r): r for r in _records((local / "metrics.jsonl").read_text())}
    got = _records(paths.resolve(f"{RUN_URL}/metrics.jsonl").read_text())
    assert {r["iter"] for r in got if "loss" in r} == set(range(N))
    for r in got:
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in r:
                assert r[key] == want[(r["iter"], "loss" in r)][key], (r, key)
    assert checkpoint.complete_steps(directory) == list(range(1, N + 1))
    bucket_params, local_params = _params(RUN_URL), _params(local)
    assert bucket_params.keys() == local_params.keys()
    assert all(np.array_equal(bucket_params[k], local_params[k]) for k in local_params)
    run_objects = emulator.objects("run/")
    assert {"run/config.json", "run/meta.pkl", "run/metrics.jsonl"} <= set(run_objects)
    # the TensorBoard events of both processes, uploaded whole: the resumed one holds its val losses
    events = sorted(o for o in run_objects if o.startswith("run/tensorboard/events.out.tfevents."))
    assert len(events) == 2, run_objects
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    downloaded = space.dir / "events"
    downloaded.mkdir()
    for name in events:
        (downloaded / name.rsplit("/", 1)[1]).write_bytes(paths.resolve(f"gs://{BUCKET}/{name}").read_bytes())
    read = EventAccumulator(str(downloaded), size_guidance={"scalars": 0})
    read.Reload()
    val = {e.step: e.value for e in read.Scalars("val_loss")}
    assert val and all(val[r["iter"]] == pytest.approx(r["val_loss"], rel=1e-6) for r in got if "val_loss" in r)
    named_after_urls = [p for p in space.dir.rglob("*")  # the children's working directory
                        if "gs:" in p.name or (p.name == BUCKET and p.parent != space.dir / "cache" / "gcs")]
    assert named_after_urls == []
    cached = space.dir / "cache" / "gcs" / BUCKET / "data" / "train.bin"  # one copy per host, reused
    assert cached.read_bytes() == (space.data / "train.bin").read_bytes()
    assert "copying gs://bucket/data/train.bin" in (space.dir / "bucket.log").read_text()
    assert "copying" not in (space.dir / "resume.log").read_text()

    def samples(out_dir):
        assert sample.main([f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=12", "--seed=3"]) == 0
        return capsys.readouterr().out

    assert samples(RUN_URL) == samples(local)  # the same weights, read from the bucket

    assert export.main([RUN_URL, "--to=hf", f"gs://{BUCKET}/hf"]) == 0
    assert {"hf/config.json", "hf/model.safetensors", "hf/meta.pkl"} <= set(emulator.objects("hf/"))
    hf = weights.load(f"gs://{BUCKET}/hf")
    assert hf.kind == "hf" and np.array_equal(np.asarray(hf.params["wte"]["embedding"]),
                                              local_params["['wte']['embedding']"])
    assert export.main([RUN_URL, "--to=nanogpt", "nano"]) == 0 and Path("nano/ckpt.pt").is_file()
    assert crosscheck.main([RUN_URL, "--seq", "8"]) == 0
    assert plot.main([RUN_URL]) == 0
    assert paths.resolve(f"{RUN_URL}/loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # two processes compiling side by side: most of a minute on two cores
def test_two_processes_write_one_bucket_checkpoint_that_one_process_restores(here):
    emulator, space = here
    port = free_port()
    url = f"gs://{BUCKET}/two"
    procs = [space.start(f"two{i}", _args(url, space.data, max_iters=2, eval_interval=2, dp=1, fsdp=-1),
                         {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    for i, proc in enumerate(procs):
        space.wait(proc, f"two{i}")
    objects = emulator.objects("two/checkpoints/2/")
    assert "two/checkpoints/2/commit_success.txt" in objects
    for i in range(2):  # each process wrote its half of the sharded arrays
        assert any(f"/state/ocdbt.process_{i}/" in name for name in objects), objects
    records = _records(paths.resolve(f"{url}/metrics.jsonl").read_text())
    assert [r["iter"] for r in records if "loss" in r] == [0, 1]  # process 0 alone writes the log
    params = _params(url)
    vocab = data.load_meta(space.data)["vocab_size"]
    assert params["['wte']['embedding']"].shape == (vocab, 32) and all(np.isfinite(v).all() for v in params.values())
    # the two processes' checkpoint resumes in one process, from the bucket
    space.wait(space.start("two-resumed", _args(url, space.data, max_iters=4, eval_interval=2, init_from="resume")),
               "two-resumed")
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(url)) == [2, 4]
    records = _records(paths.resolve(f"{url}/metrics.jsonl").read_text())
    assert [r["iter"] for r in records if "loss" in r] == [0, 1, 2, 3]
