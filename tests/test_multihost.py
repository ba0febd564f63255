"""Two processes on this machine standing in for two hosts: `python -m gptjax.train`'s loop joined
through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (gloo collectives on CPU),
with the parameters split over both processes (2 devices each, dp=1 x fsdp=4).

It trains as one process does (losses to rtol 1e-5: float32 sums in another order), only process 0
writes metrics.jsonl, and checkpoints are interchangeable between the two layouts. Workers run in
subprocesses with a deadline and are killed on failure, so a hung collective cannot block CI.
"""

import json
import socket
from pathlib import Path

import jax
import numpy as np
import pytest

import _sharding_worker as worker
from gptjax.checkpoint import load_inference

pytestmark = pytest.mark.skipif(not worker.CORPUS.is_file(), reason=f"{worker.CORPUS} absent")
LOSS_RTOL = 1e-5
TIMEOUT_S = 240
TWO_HOSTS = ["--dp=1", "--fsdp=-1"]  # 4 devices over 2 processes: every process holds half of each big array


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, data_dir: Path, processes: int, overrides: list[str]) -> list:
    """Launch one training run of `processes` processes (2 devices each when several)."""
    script = str(Path(worker.__file__))
    if processes == 1:
        argv = [script, "train", "--devices", "1", "--data", str(data_dir), "--out", str(out), *overrides]
        return [(worker.launch(argv, out.with_suffix(".log")), out.with_suffix(".log"))]
    port, procs = _free_port(), []
    for i in range(processes):
        env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
               "JAX_PROCESS_ID": str(i)}
        argv = [script, "train", "--devices", "2", "--data", str(data_dir), "--out", str(out), *TWO_HOSTS,
                *overrides]
        log = out.with_name(f"{out.name}.p{i}.log")
        procs.append((worker.launch(argv, log, env), log))
    return procs


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict], key: str) -> dict[int, list[float]]:
    """{iter: [value, ...]} in file order (a resumed run re-evaluates its first iteration)."""
    out: dict[int, list[float]] = {}
    for r in records:
        if key in r:
            out.setdefault(r["iter"], []).append(r[key])
    return out


def _params(out: Path) -> dict:
    params, _, _ = load_inference(out)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 iterations (checkpoints at 2 and 4) by one process and, at the same time, by two."""
    tmp = tmp_path_factory.mktemp("multihost")
    data_dir = worker.prepare_data(tmp / "data")
    one, two = tmp / "one", tmp / "two"
    common = ["--max_iters=4", "--eval_interval=2"]
    worker.wait_all(_start(one, data_dir, 1, common) + _start(two, data_dir, 2, common), TIMEOUT_S)
    return data_dir, one, two


def test_two_processes_train_like_one(runs):
    _, one, two = runs
    rec_one, rec_two = _records(one), _records(two)
    # process 1 logged nothing: the shared metrics.jsonl holds one run's records, not two
    assert [sorted(r) for r in rec_two] == [sorted(r) for r in rec_one]
    loss_one, loss_two = _losses(rec_one, "loss"), _losses(rec_two, "loss")
    assert sorted(loss_two) == [0, 1, 2, 3]
    assert loss_one[0][0] - loss_one[3][0] > 0.1  # it trains
    np.testing.assert_allclose([loss_two[i] for i in range(4)], [loss_one[i] for i in range(4)], rtol=LOSS_RTOL)
    for key in ("train_loss", "val_loss"):
        a, b = _losses(rec_two, key), _losses(rec_one, key)
        assert sorted(a) == [0, 2, 4]
        np.testing.assert_allclose([a[i] for i in a], [b[i] for i in a], rtol=LOSS_RTOL)
    # and printed nothing: the console belongs to process 0
    logs = [two.with_name(f"two.p{i}.log").read_text() for i in (0, 1)]
    assert "step 4: train loss" in logs[0] and "train loss" not in logs[1] and "parameters" not in logs[1]
    # both processes ran to the end and saw the same (replicated) metrics
    finals = [json.loads((two / f"result.{i}.json").read_text()) for i in (0, 1)]
    assert finals[0] == finals[1] and finals[0]["iter"] == 4


def test_two_process_checkpoint_loads_in_one_process(runs):
    """Each process wrote its halves of the split arrays; one process reads them whole."""
    _, one, two = runs
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    # orbax keeps one shard store per writing process
    assert sorted(p.name for p in (two / "checkpoints/4/state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    params_two, params_one = _params(two), _params(one)
    assert params_two.keys() == params_one.keys()
    # AdamW turns rounding noise in near-zero gradient entries into lr-sized moves (see test_sharding)
    for key, p in params_two.items():
        np.testing.assert_allclose(p, params_one[key], rtol=1e-5, atol=5e-5, err_msg=key)


@pytest.mark.slow
def test_resume_across_process_counts(runs):
    """Two processes resume the one-process run and one process the two-process run: each
    re-evaluates iteration 4 exactly as before the restart, and both continue alike."""
    data_dir, one, two = runs
    more = ["--max_iters=6", "--eval_interval=2", "--init_from=resume"]
    worker.wait_all(_start(one, data_dir, 2, more) + _start(two, data_dir, 1, more), TIMEOUT_S)
    for out in (one, two):
        for key in ("train_loss", "val_loss"):
            before, after = _losses(_records(out), key)[4]
            np.testing.assert_allclose(after, before, rtol=LOSS_RTOL)
    loss_one, loss_two = _losses(_records(one), "loss"), _losses(_records(two), "loss")
    assert sorted(loss_one) == sorted(loss_two) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose([loss_one[i] for i in (4, 5)], [loss_two[i] for i in (4, 5)], rtol=LOSS_RTOL)
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
