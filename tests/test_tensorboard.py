"""TensorBoard events beside metrics.jsonl: switched off by one flag, and a failed write stops the
run with the same one-line error as metrics.jsonl's (the events' reading back against metrics.jsonl
is in test_harness, with the task metrics)."""

import errno

from tensorboard.summary.writer.event_file_writer import EventFileWriter

from gptjax import train
from test_train import tiny


def test_tensorboard_false_writes_no_events(char_data, tmp_path):
    train.train(tiny(char_data, tmp_path / "off", max_iters=2, eval_interval=2, tensorboard=False))
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and not (tmp_path / "off" / "tensorboard").exists()


def test_a_failed_event_write_is_one_error_line(char_data, tmp_path, monkeypatch, capsys):
    calls = []

    def add_event(self, event):  # the writer's thread found the disk full
        calls.append(event.step)
        if event.step >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventFileWriter, "add_event", add_event)
    out = tmp_path / "run"
    argv = [f"--{k}={v}" for k, v in tiny(char_data, out, max_iters=20, eval_interval=4).to_dict().items()
            if k in ("out_dir", "dataset", "data_dir", "vocab_size", "n_layer", "n_head", "n_embd", "block_size",
                     "batch_size", "max_iters", "eval_interval", "eval_iters")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: could not write the TensorBoard events in {out / 'tensorboard'} at iter 5 "
                          "(No space left on device): free disk space. The last checkpoint (iter 4) is untouched; "
                          "resume with --init_from=resume"), err
    assert max(calls) == 5
