"""The microbenchmark (benchmarks/) runs end to end on a tiny grid and records what it promises;
a baseline that cannot fit is recorded, not fatal."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import run as benchmark  # the repository's benchmarks/: `python -m pytest` runs from the root
from benchmarks.cases import Case, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATS = {"median", "q25", "q75", "min", "max", "samples"}


def test_quick_run_writes_the_record(tmp_path):
    with_plot = importlib.util.find_spec("matplotlib") is not None
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--fused-backend", "reference",
               "--out", str(tmp_path)] + ([] if with_plot else ["--no-plot"])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fwd+bwd ms" in result.stdout

    [path] = glob.glob(str(tmp_path / "*.json"))
    record = json.load(open(path))
    assert {"environment", "fused_backend", "command", "timing_plan", "rows", "targets",
            "wall_time_s"} <= record.keys()
    assert {"device", "device_name", "cpu_model", "threads", "torch", "triton", "python",
            "date"} <= record["environment"].keys()
    assert record["fused_backend"] == "reference"
    assert record["fused_max_relative_error"] < 1e-6  # the reference against itself
    assert {(row["label_form"], row["impl"]) for row in record["rows"]} == \
        {(form, impl) for form in ("class", "pair", "batch") for impl in ("naive", "fused", "floor")}
    for row in record["rows"]:
        assert row["status"] == "ok", row
        for phase in ("forward_ms", "backward_ms", "fwd_bwd_ms"):
            assert STATS <= row[phase].keys() and row[phase]["median"] > 0
        assert row["speedup_vs_naive"] > 0
        assert (row["fraction_of_floor"] is None) == (row["impl"] == "floor")
        if row["impl"] != "floor" and sys.platform == "linux":
            assert row["peak_memory_bytes"] is not None
    assert bool(glob.glob(str(tmp_path / "*.png"))) == with_plot


def test_baseline_estimated_too_big_is_skipped(monkeypatch):
    monkeypatch.setattr(benchmark, "available_bytes", lambda device: 1000)
    case = Case("class", 4, 32, 8, "fp32")
    row = benchmark.measure(case, "naive", make_inputs(case, "cpu"), "cpu", "reference")
    assert row["status"] == "skipped" and "GB" in row["note"]


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_out_of_memory_is_recorded(monkeypatch, error):
    def build_step(*args):
        raise error

    monkeypatch.setattr(benchmark, "build_step", build_step)
    case = Case("class", 4, 32, 8, "fp32")
    row = benchmark.measure(case, "naive", make_inputs(case, "cpu"), "cpu", "reference")
    assert row["status"] == "oom"


def test_pml_memory_benchmark_runs(tmp_path, capsys):
    """python -m benchmarks.pml_memory in a tiny size: both rows, a record."""
    from benchmarks import pml_memory
    assert pml_memory.main(["--batch", "16", "--memory", "64", "--dim", "8", "--device", "cpu",
                            "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "pml " in printed and "fused " in printed and "faster" in printed
    assert len(list(tmp_path.glob("pml_memory_*.json"))) == 1
