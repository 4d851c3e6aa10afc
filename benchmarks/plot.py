"""Optional PNG: fwd+bwd time and peak memory growth against C (or N) on log-log axes, one line per
implementation and series (label form, B, D, dtype). Needs matplotlib; without it the run goes on.

Also plots a record written elsewhere (e.g. on a GPU machine without matplotlib):
    python -m benchmarks.plot benchmarks/results/<record>.json   # writes <record>.png beside it
"""
import json
import os
import sys

STYLES = {"naive": "tab:red", "compiled": "tab:orange", "fused": "tab:blue", "floor": "tab:gray"}


def _series(rows: list) -> dict:
    """{(impl, label form, B, D, dtype): sorted [(N, fwd+bwd ms, peak MB or None)]} of the measured rows."""
    series = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = (row["impl"], row["label_form"], row["B"], row["D"], row["dtype"])
        memory = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2**20
        series.setdefault(key, []).append((row["N"], row["fwd_bwd_ms"]["median"], memory))
    return {key: sorted(points) for key, points in series.items()}


def plot_record(record: dict, path: str):
    """Writes the plot to path and returns it, or returns None with the reason printed when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for (impl, label_form, B, D, dtype), points in _series(record["rows"]).items():
        label = f"{impl} ({label_form} B={B} D={D} {dtype})"
        style = dict(color=STYLES.get(impl), linestyle="-" if label_form == "class" else "--", marker="o")
        sizes = [n for n, _, _ in points]
        time_axis.plot(sizes, [ms for _, ms, _ in points], label=label, **style)
        with_memory = [(n, mb) for n, _, mb in points if mb is not None and mb > 0]
        if with_memory and impl != "floor":
            memory_axis.plot(*zip(*with_memory), label=label, **style)
    environment = record["environment"]
    for axis, ylabel in ((time_axis, "forward + backward time (ms, median)"),
                         (memory_axis, "peak memory growth (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("C (class level, solid) or N (pair-wise, dashed)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=7)
    figure.suptitle(f"circleloss-ext on {environment['device_name']}, fused = {record['fused_backend']}, "
                    f"torch {environment['torch']}, {environment['date']}", fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    for record_path in sys.argv[1:]:
        with open(record_path) as record_file:
            written = plot_record(json.load(record_file), os.path.splitext(record_path)[0] + ".png")
        if written:
            print(written)
