"""Timing of one training step split into forward and backward, repeated: median and spread.

Each repetition records three timestamps back to back (before the forward, between forward and
backward, after the backward), so one run gives the forward, the backward and their sum, the
forward + backward time, with nothing left out between the phases. On CUDA the timestamps are
CUDA events (GPU time, no synchronisation between the phases); on the CPU, where the ops run
synchronously, time.perf_counter.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TimingPlan:
    """Untimed warmup steps, then timed steps: at least min_reps, more while the timed steps have
    taken less than budget_s in all, at most max_reps."""
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


PLANS = {"cpu": TimingPlan(warmup=1, min_reps=3, max_reps=10, budget_s=2.0),
         "cuda": TimingPlan(warmup=3, min_reps=10, max_reps=100, budget_s=2.0)}


@dataclass
class Step:
    """One training step of an implementation: prepare() is untimed (drops the gradients of the
    previous step), forward() returns what backward(state) consumes."""
    prepare: Callable[[], None]
    forward: Callable[[], Any]
    backward: Callable[[Any], None]


def _phases_ms(step: Step, device: str) -> tuple:
    """(forward ms, backward ms) of one step."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        state = step.forward()
        middle.record()
        step.backward(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(middle), middle.elapsed_time(end)
    start = time.perf_counter()
    state = step.forward()
    middle = time.perf_counter()
    step.backward(state)
    end = time.perf_counter()
    return (middle - start) * 1e3, (end - middle) * 1e3


def summarize(samples_ms: list) -> dict:
    """Median, quartiles, extremes and the samples themselves, in milliseconds."""
    q25, _, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive") if len(samples_ms) > 1 \
        else (samples_ms[0],) * 3
    return {"median": statistics.median(samples_ms), "q25": q25, "q75": q75, "min": min(samples_ms),
            "max": max(samples_ms), "samples": samples_ms}


def warm_up(step: Step, device: str, plan: TimingPlan) -> float:
    """Runs the warmup steps (torch.compile compiles here); returns their wall time in seconds."""
    start = time.perf_counter()
    for _ in range(plan.warmup):
        step.prepare()
        _phases_ms(step, device)
    return time.perf_counter() - start


def time_step(step: Step, device: str, plan: TimingPlan) -> dict:
    """Forward, backward and forward + backward statistics (ms) of the timed steps."""
    forward, backward = [], []
    while len(forward) < plan.max_reps:
        step.prepare()
        forward_ms, backward_ms = _phases_ms(step, device)
        forward.append(forward_ms)
        backward.append(backward_ms)
        if len(forward) >= plan.min_reps and (sum(forward) + sum(backward)) / 1e3 >= plan.budget_s:
            break
    return {"forward_ms": summarize(forward), "backward_ms": summarize(backward),
            "fwd_bwd_ms": summarize([f + b for f, b in zip(forward, backward)]), "reps": len(forward)}
