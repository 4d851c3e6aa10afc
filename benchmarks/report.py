"""What a run reports: the comparisons of each row, the table, the targets and the JSON record."""
import datetime
import json
import os
import platform
import re
import subprocess

import torch

from .cases import GPU_CASE_A, TARGET_CASE

# The targets for the fused backend, by case: (what, row field, threshold, "min" if the value must be
# at least the threshold, "max" if at most). The CPU target case is issue 3's; case A is issue 8's
# GPU goal (70% of the floor's speed: at most 1/0.7 of its time).
TARGETS = {
    TARGET_CASE.name: (("fused fwd+bwd >= 4x faster than naive", "speedup_vs_naive", 4.0, "min"),
                       ("fused fwd+bwd >= 2x faster than torch.compile", "speedup_vs_compiled", 2.0, "min"),
                       ("fused peak memory growth <= 5% of naive's", "memory_vs_naive", 0.05, "max"),
                       ("fused fwd+bwd <= 2x the matmul floor", "fraction_of_floor", 2.0, "max")),
    GPU_CASE_A.name: (("fused fwd+bwd >= 3x faster than naive", "speedup_vs_naive", 3.0, "min"),
                      ("fused fwd+bwd >= 2x faster than torch.compile", "speedup_vs_compiled", 2.0, "min"),
                      ("fused fwd+bwd at >= 70% of the floor's speed", "fraction_of_floor", 1 / 0.7, "max")),
}


def _median(row, field="fwd_bwd_ms"):
    return row[field]["median"] if row and row["status"] == "ok" else None


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def add_comparisons(rows: list) -> None:
    """Adds to each row, within its case: speedup_vs_naive and speedup_vs_compiled (their fwd+bwd
    median over the row's), fraction_of_floor (the row's fwd+bwd median over the floor's) and
    memory_vs_naive (the row's peak memory growth over naive's)."""
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row
    for row in rows:
        same_case = by_case[row["case"]]
        naive, compiled, floor = (same_case.get(name) for name in ("naive", "compiled", "floor"))
        time = _median(row)
        row["speedup_vs_naive"] = _ratio(_median(naive), time)
        row["speedup_vs_compiled"] = _ratio(_median(compiled), time)
        row["fraction_of_floor"] = _ratio(time, _median(floor)) if row["impl"] != "floor" else None
        naive_memory = naive["peak_memory_bytes"] if naive and naive["status"] == "ok" else None
        row["memory_vs_naive"] = _ratio(row["peak_memory_bytes"], naive_memory) if time is not None else None


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(rows: list, fused_backend: str) -> str:
    """One block per case, one line per implementation."""
    names = {"fused": f"fused:{fused_backend}"}
    header = (f"{'impl':<16}{'fwd ms':>10}{'bwd ms':>10}{'fwd+bwd ms':>12}{'IQR ms':>18}{'peak MB':>10}"
              f"{'x naive':>9}{'x compiled':>11}{'/ floor':>9}")
    lines, case = [header, "-" * len(header)], None
    for row in rows:
        if row["case"] != case:
            case = row["case"]
            lines.append(case)
        name = names.get(row["impl"], row["impl"])
        if row["status"] != "ok":
            lines.append(f"  {name:<14}{row['status'].upper()}: {row['note'].splitlines()[0][:120]}")
            continue
        fwd_bwd = row["fwd_bwd_ms"]
        iqr = f"{fwd_bwd['q25']:.1f}-{fwd_bwd['q75']:.1f}"
        memory = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2**20
        lines.append(f"  {name:<14}{row['forward_ms']['median']:>10.1f}{row['backward_ms']['median']:>10.1f}"
                     f"{fwd_bwd['median']:>12.1f}{iqr:>18}{_cell(memory, '.0f'):>10}"
                     f"{_cell(row['speedup_vs_naive'], '.2f'):>9}{_cell(row['speedup_vs_compiled'], '.2f'):>11}"
                     f"{_cell(row['fraction_of_floor'], '.2f'):>9}")
    return "\n".join(lines)


def check_targets(rows: list) -> list:
    """The targets on the fused row of each case that has targets: value, threshold and whether it
    is met (None when a number is missing). Empty when no such case ran."""
    results = []
    for case, targets in TARGETS.items():
        fused = next((row for row in rows if row["case"] == case and row["impl"] == "fused"), None)
        if fused is None:
            continue
        for what, field, threshold, bound in targets:
            value = fused.get(field)
            met = None if value is None else (value >= threshold if bound == "min" else value <= threshold)
            results.append({"case": case, "target": what, "field": field, "value": value, "threshold": threshold,
                            "met": met})
    return results


def format_targets(targets: list) -> str:
    lines, case = [], None
    for target in targets:
        if target["case"] != case:
            case = target["case"]
            lines.append(f"targets ({case}):")
        value = target["value"]
        shown = "-" if value is None else (f"{value:.1%}" if target["field"] == "memory_vs_naive" else f"{value:.2f}x")
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"  {target['target']:<48}{shown:>10}  {verdict}")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str):
    try:
        return __import__(module_name).__version__
    except ImportError:
        return None


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str) -> dict:
    """Where and with what the numbers were taken."""
    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
            "cpu_model": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": _version("triton"), "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": _git_commit(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def write_record(record: dict, out_dir: str, prefix: str = "") -> str:
    """Writes the record as <out_dir>/<prefix><device name>_<date>.json; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", record["environment"]["device_name"]).strip("-").lower()
    stamp = datetime.datetime.fromisoformat(record["environment"]["date"]).strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"{prefix}{device}_{stamp}.json")
    with open(path, "w") as file:
        json.dump(record, file, indent=1)
    return path
