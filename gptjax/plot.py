"""Loss curves of a training run: `python -m gptjax.plot OUT_DIR [--out PNG]`.

Reads OUT_DIR/metrics.jsonl (written by gptjax.train) and draws the per-step training loss (raw,
faint, plus a lightly smoothed line) and the periodic eval train/val losses against iteration.
matplotlib is an optional extra: `pip install gptjax[plot]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from gptjax import paths

METRICS_FILE = "metrics.jsonl"


def read_metrics(out_dir: str | os.PathLike) -> tuple[dict[int, float], dict[int, tuple[float, float]]]:
    """({iter: step loss}, {iter: (eval train loss, eval val loss)}) from OUT_DIR/metrics.jsonl.

    A resumed run appends the iterations after its checkpoint again; the later record of an
    iteration wins, so the curves show the run that produced the final checkpoint."""
    path = paths.resolve(out_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {out_dir}: train first with `python -m gptjax.train ... --out_dir={out_dir}`"
        )
    steps: dict[int, float] = {}
    evals: dict[int, tuple[float, float]] = {}
    torn = []
    for number, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # cut off by a crash or a full disk while it was written
            torn.append(number)
            continue
        if not isinstance(record, dict) or "iter" not in record:
            torn.append(number)
            continue
        if "loss" in record:
            steps[int(record["iter"])] = float(record["loss"])
        if "val_loss" in record:
            evals[int(record["iter"])] = (float(record["train_loss"]), float(record["val_loss"]))
    if torn:
        print(f"warning: skipped {len(torn)} torn line(s) of {path} (line {', '.join(map(str, torn[:5]))}"
              f"{' ...' if len(torn) > 5 else ''}), cut off while written by a crash or a full disk", file=sys.stderr)
    if not steps and not evals:
        raise ValueError(f"{path} holds no step or eval records yet: train for a few iterations first")
    return dict(sorted(steps.items())), dict(sorted(evals.items()))


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points, narrowed symmetrically at the ends: unlike an
    exponential average it does not lag behind a falling loss."""
    out = []
    for i in range(len(values)):
        half = min(window // 2, i, len(values) - 1 - i)
        out.append(sum(values[i - half : i + half + 1]) / (2 * half + 1))
    return out


def _new_figure():
    # A bare Figure on an Agg canvas: writes files without a display and, unlike pyplot, never
    # switches the backend of a notebook or program that imports this module.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install gptjax[plot]") from None
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_metrics(out_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Draw OUT_DIR/metrics.jsonl's loss curves into `out_path` (default OUT_DIR/loss.png); either
    may be a gs:// URL."""
    steps, evals = read_metrics(out_dir)
    fig = _new_figure()
    ax = fig.subplots()
    out_path = paths.resolve(out_path) if out_path is not None else paths.resolve(out_dir) / "loss.png"
    if steps:
        iters, losses = list(steps), list(steps.values())
        window = len(losses) // 50 * 2 + 1  # ~2% of the points: light smoothing
        ax.plot(iters, losses, color="tab:blue", alpha=0.3 if window > 1 else 0.8, linewidth=0.8,
                label="train (step)")
        if window > 1:
            ax.plot(iters, smooth(losses, window), color="tab:blue", linewidth=1.6,
                    label=f"train (step, {window}-point mean)")
    if evals:
        iters = list(evals)
        ax.plot(iters, [t for t, _ in evals.values()], "o-", color="tab:green", markersize=3, label="eval train")
        ax.plot(iters, [v for _, v in evals.values()], "o-", color="tab:red", markersize=3, label="eval val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    name = paths.resolve(out_dir).name if paths.is_remote(out_dir) else Path(out_dir).resolve().name
    ax.set_title(f"{name}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format=out_path.suffix[1:] or "png")
    paths.write_bytes(out_path, image.getvalue())
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptjax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a training run's out_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default OUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.out_dir, args.out)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
