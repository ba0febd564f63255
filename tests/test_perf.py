"""A run's MFU is against the CPU's peak FLOP/s, measured once per host and kept in gptjax's cache."""

import json

import pytest

from gptjax import perf

MEASURED = 123e9


@pytest.fixture
def measurements(monkeypatch, tmp_path):
    """gptjax's cache in tmp_path, each measurement of the peak counted (the n-th reads MEASURED + n)."""
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(*args, **kwargs):
        calls.append(1)
        return MEASURED + len(calls)

    monkeypatch.setattr(perf, "measure_matmul_flops", measure)
    forget_in_memory()
    yield calls
    forget_in_memory()


def forget_in_memory():
    """What a new process starts from: no figure in memory, only gptjax's cache."""
    perf.device_peak_flops.cache_clear()
    perf.recorded_peak_flops.cache_clear()


def test_the_peak_is_measured_once_per_host_and_a_benchmarks_figure_replaces_it(measurements, tmp_path):
    peak, _ = perf.recorded_peak_flops()
    assert peak == MEASURED + 1 and len(measurements) == 1
    (key, record), = json.loads((tmp_path / perf.PEAK_RECORDS).read_text()).items()
    assert perf.cpu_model() in key and record["flops"] == peak

    forget_in_memory()
    peak, source = perf.recorded_peak_flops()
    assert peak == MEASURED + 1 and len(measurements) == 1, "a later run measured again"
    assert record["measured"] in source

    forget_in_memory()  # a benchmark measures afresh, and the runs after it take its figure
    assert perf.keep_peak_flops(*perf.device_peak_flops())[0] == MEASURED + 2
    perf.recorded_peak_flops.cache_clear()
    assert perf.recorded_peak_flops()[0] == MEASURED + 2 and len(measurements) == 2


def test_an_unreadable_record_is_measured_again_with_a_warning(measurements, tmp_path):
    (tmp_path / perf.PEAK_RECORDS).write_text("{not json")
    with pytest.warns(UserWarning, match="delete it and it is measured again"):
        assert perf.recorded_peak_flops()[0] == MEASURED + 1
    assert json.loads((tmp_path / perf.PEAK_RECORDS).read_text()), "the record was not written again"
    forget_in_memory()  # a record without a figure is measured again too
    (tmp_path / perf.PEAK_RECORDS).write_text(json.dumps({perf._peak_key(): {"measured": "2026-01-01"}}))
    assert perf.recorded_peak_flops()[0] == MEASURED + 2


def test_mfu_is_against_the_peak_given(measurements):
    assert perf.mfu(50e9, 1.0, peak=100e9) == pytest.approx(0.5)
    assert not measurements, "mfu measured a peak it was given"


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(measurements, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(UserWarning, match="could not keep the measured peak"):
        assert perf.recorded_peak_flops()[0] == MEASURED + 1
