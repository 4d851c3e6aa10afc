"""Measure candidate launch configurations of the fused kernels on a GPU, one kernel at a time.

    python -m benchmarks.tune_presets [--cases A C]

For each kernel of kernels/presets.py (sm_90, 16-bit) every candidate replaces the preset while the
others keep theirs, and the step that runs that kernel (forward, or backward) is timed with
triton.testing.do_bench on the gpu-check cases. The presets are chosen from this table.
"""
import argparse

import torch
import triton

from circleloss_ext.kernels import presets

from .cases import GPU_CASE_A, GPU_CASE_C, make_inputs
from .implementations import LOSSES

R = {"RESIDENT_KEYS": True}  # grad_similarity holds its key tile for the whole row walk (tile.resident_tile)
RR = {"RESIDENT_ROWS": True}  # the forward holds its row block for the whole key walk (D in at most 2 chunks)
CANDIDATES = {  # (BLOCK_B, BLOCK_N, BLOCK_D, warps, stages[, constexprs])
    # forward and forward_pairwise share BLOCK_B (a sorted problem indexes one table of row blocks)
    # (resident rows: case C's D = 128 only; at D = 512 they stream as without)
    "forward": [(128, 256, 64, 8, 3), (128, 256, 128, 8, 2), (128, 256, 64, 8, 2), (128, 128, 64, 8, 3),
                (128, 256, 64, 8, 4), (128, 256, 64, 8, 2, RR)],
    "forward_pairwise": [(128, 256, 128, 8, 2), (128, 256, 64, 8, 3), (128, 128, 128, 8, 2), (128, 256, 128, 8, 2, RR)],
    # resident keys: at D = 512 (case A) 64 keys fit two stages of rows (205 KB), 128 keys one (165 KB);
    # at D = 128 (case C) the keys are one 128-wide chunk and more stages fit
    "grad_similarity": [(64, 128, 256, 4, 2), (64, 256, 128, 4, 2), (64, 128, 128, 4, 2), (64, 64, 256, 4, 2, R),
                        (64, 128, 256, 4, 1, R), (64, 128, 256, 4, 3, R), (64, 256, 256, 4, 2, R)],
    "grad_similarity_pairwise": [(64, 128, 256, 4, 2), (64, 64, 256, 4, 2), (64, 128, 128, 4, 2),
                                 (64, 128, 256, 4, 3, R)],
    "grad_queries": [(128, 64, 128, 8, 4), (128, 64, 256, 8, 3), (64, 64, 128, 4, 4), (128, 128, 128, 8, 3),
                     (128, 128, 256, 8, 2)],
    # grad_keys: BLOCK_D is each of its two accumulators' width; both together hold D = 512 whole
    "grad_keys": [(64, 64, 256, 8, 3), (64, 64, 256, 8, 2), (32, 64, 256, 8, 3), (32, 64, 256, 8, 4)],
}
# (grad_similarity_full, class-level with the true derivative, runs in none of the cases, which detach α)
CASES = {"A": GPU_CASE_A, "C": GPU_CASE_C}
# Loss and gradients of a candidate against the preset's, relative to the largest entry: tile shapes
# change only the order of float32 sums and where bf16 roundings fall (H), far below this.
DISAGREEMENT = 2e-2


def _step_times(case) -> tuple[float, float, list]:
    """(forward ms, backward ms, [loss, gradients]) of one fused step on the case's inputs (seeded: the
    same for every candidate)."""
    inputs = make_inputs(case, "cuda")
    if case.label_form == "batch":
        args = [inputs["embeddings"], inputs["labels"]]
    else:
        args = [inputs[name] for name in ("embeddings", "keys", "labels", "key_labels") if name in inputs]
    loss_fn = LOSSES[case.label_form]
    leaves = [inputs["embeddings"]] + ([inputs["keys"]] if "keys" in inputs else [])
    forward_ms = triton.testing.do_bench(lambda: loss_fn(*args, backend="triton"), warmup=2, rep=20)
    loss = loss_fn(*args, backend="triton")
    backward_ms = triton.testing.do_bench(lambda: loss.backward(retain_graph=True), warmup=2, rep=20,
                                          grad_to_none=leaves)
    for leaf in leaves:
        leaf.grad = None
    loss.backward()
    return forward_ms, backward_ms, [loss.detach().float()] + [leaf.grad.float() for leaf in leaves]


def _disagreement(result, baseline) -> float:
    """The largest difference from the preset's own result, relative to each tensor's largest entry: a
    candidate that computes something else (a miscompiled variant) is flagged, not timed as a winner."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(result, baseline))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_presets", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["A", "C"], choices=sorted(CASES))
    parser.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args(argv)
    table = presets.PRESETS[(presets.arch_family(*_capability()), "16")]
    print(torch.cuda.get_device_name(), flush=True)
    for name in args.cases:
        case = CASES[name]
        *_, baseline = _step_times(case)
        for kernel in args.kernels:
            candidates, current = CANDIDATES[kernel], table[kernel]
            for blocks in candidates:
                table[kernel] = presets._tiles(*blocks[:5], **(blocks[5] if len(blocks) > 5 else {}))
                try:
                    forward_ms, backward_ms, result = _step_times(case)
                    timing = f"forward {forward_ms:7.2f} ms  backward {backward_ms:7.2f} ms"
                    disagreement = _disagreement(result, baseline)
                    if disagreement > DISAGREEMENT:
                        timing += f"  DIFFERS from the preset's result by {disagreement:.1e}"
                except Exception as error:  # a candidate that does not fit is reported, not fatal
                    timing = f"FAILED {type(error).__name__}: {str(error)[:80]}"
                print(f"case {name} {kernel:16s} {table[kernel].label():44s} {timing}", flush=True)
            table[kernel] = current


def _capability():
    properties = torch.cuda.get_device_properties(0)
    return properties.major, getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)


if __name__ == "__main__":
    main()
