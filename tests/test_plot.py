"""Loss plots from a run's metrics.jsonl: `gptjax.plot`."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from _compile_cache import session_compile_cache
from gptjax import plot
from gptjax.config import TrainConfig
from gptjax.prepare import prepare_shakespeare_char
from gptjax.train import train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """metrics.jsonl of a real 12-iteration run of test_train's tiny model. The session-wide
    compilation cache lets test_train reuse these compiled steps (and the other way round)."""
    if not CORPUS.is_file():
        pytest.skip(f"tiny-shakespeare corpus not found at {CORPUS}")
    data = tmp_path_factory.mktemp("shakespeare_char")
    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:50_000], data)
    out = tmp_path_factory.mktemp("run")
    with session_compile_cache(tmp_path_factory):
        train(TrainConfig(
            out_dir=str(out), dataset="shakespeare_char", data_dir=str(data), vocab_size=65, n_layer=2,
            n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2,
            activation="gelu_tanh", max_iters=12, eval_interval=4, eval_iters=2, learning_rate=1e-2,
            min_lr=1e-3, warmup_iters=2, lr_decay_iters=40,
        ))
    return out


def _write(path: Path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_png_from_a_short_run(short_run, tmp_path):
    pytest.importorskip("matplotlib")
    steps, evals = plot.read_metrics(short_run)
    assert list(steps) == list(range(12)) and list(evals) == [0, 4, 8, 12]
    path = plot.plot_metrics(short_run)
    assert path == short_run / "loss.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (960, 600)  # 8 x 5 inches at 120 dpi
    # the curves were drawn: many pixels of each line's hue (blue train, green and red eval)
    import matplotlib.image

    r, g, b = np.moveaxis(matplotlib.image.imread(path)[..., :3] * 255, -1, 0)
    for name, hue in (("blue", (b > r + 60) & (b > g + 20)), ("green", (g > r + 60) & (g > b + 60)),
                      ("red", (r > g + 80) & (r > b + 80))):
        assert hue.sum() > 200, name

    assert plot.main([str(short_run), "--out", str(tmp_path / "elsewhere" / "l.png")]) == 0
    assert (tmp_path / "elsewhere" / "l.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in .*python -m gptjax\.train"):
        plot.plot_metrics(tmp_path)
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no metrics.jsonl in") and err.count("\n") == 1
    assert not (tmp_path / "loss.png").exists()


def test_later_records_of_an_iteration_win(tmp_path):
    """A resumed run logs the iterations after its checkpoint again."""
    _write(tmp_path / "metrics.jsonl", [
        {"iter": 0, "train_loss": 4.2, "val_loss": 4.3}, {"iter": 0, "loss": 4.1, "lr": 1e-3},
        {"iter": 1, "loss": 4.0, "lr": 1e-3}, {"iter": 2, "loss": 3.9, "lr": 1e-3},
        {"iter": 1, "loss": 3.5, "lr": 1e-3}, {"iter": 2, "loss": 3.4, "lr": 1e-3},  # after resume at 1
        {"iter": 3, "train_loss": 3.3, "val_loss": 3.6},
    ])
    steps, evals = plot.read_metrics(tmp_path)
    assert steps == {0: 4.1, 1: 3.5, 2: 3.4}
    assert evals == {0: (4.2, 4.3), 3: (3.3, 3.6)}


def test_torn_lines_are_skipped_with_a_warning(tmp_path, capsys):
    records = [{"iter": 0, "loss": 4.1, "lr": 1e-3}, {"iter": 1, "loss": 4.0, "lr": 1e-3}]
    _write(tmp_path / "metrics.jsonl", records, tail='{"iter": 2, "lo')  # killed mid-write
    assert plot.read_metrics(tmp_path)[0] == {0: 4.1, 1: 4.0}
    assert "skipped 1 torn line(s)" in capsys.readouterr().err
    # a run resumed after a torn line, by a gptjax that appended after it
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 4.1}\n{"iter": 1, "lo{"iter": 1, "loss": 3.9}\n'
                                            '{"iter": 2, "loss": 3.8}\n')
    assert plot.read_metrics(tmp_path)[0] == {0: 4.1, 2: 3.8}
    assert "(line 2)" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no step or eval records"):
        plot.read_metrics(tmp_path)


def test_smoothing_is_a_centred_mean():
    assert plot.smooth([1.0, 2.0, 3.0, 10.0, 5.0], 3) == [1.0, 2.0, 5.0, 6.0, 5.0]
    assert plot.smooth([3.0, 1.0], 1) == [3.0, 1.0]


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    _write(tmp_path / "metrics.jsonl", [{"iter": 0, "loss": 4.1, "lr": 1e-3}])
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` fail
    with pytest.raises(ImportError, match=r"pip install gptjax\[plot\]"):
        plot.plot_metrics(tmp_path)
