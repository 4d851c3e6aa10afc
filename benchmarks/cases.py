"""The benchmark grid: which (label form, B, C or N, D, dtype) cases run, and their inputs."""
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One shape. label_form "class": B embeddings against a class matrix W of N = C rows;
    "pair": B embeddings against a labelled reference set of N rows; "batch": the B embeddings
    against each other (N = B, the pair (i, i) left out)."""
    label_form: str
    B: int
    N: int
    D: int
    dtype: str

    @property
    def name(self) -> str:
        if self.label_form == "batch":
            return f"batch-B{self.B}-D{self.D}-{self.dtype}"
        keys = "C" if self.label_form == "class" else "N"
        return f"{self.label_form}-B{self.B}-{keys}{self.N}-D{self.D}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# The case the targets are stated for (CPU, fp32).
TARGET_CASE = Case("class", 512, 100_000, 128, "fp32")


def default_grid() -> list:
    """The CPU grid: the target case, two smaller C for the trend, one pair-wise case (about 3 min)."""
    return [Case("class", 512, 10_000, 128, "fp32"), Case("class", 512, 30_000, 128, "fp32"), TARGET_CASE,
            Case("pair", 512, 16_384, 128, "fp32")]


def full_grid() -> list:
    """The GPU grid: class level C = 10^4 .. 1.6·10^7 and pair-wise N = 4096 .. 65536 at B = 1024,
    D = 512 in bf16, plus the target case."""
    class_level = [Case("class", 1024, c, 512, "bf16")
                   for c in (10_000, 40_000, 160_000, 640_000, 2_560_000, 10_240_000, 16_000_000)]
    pair_wise = [Case("pair", 1024, n, 512, "bf16") for n in (4096, 16_384, 65_536)]
    return [TARGET_CASE] + class_level + pair_wise


# The GPU goals (issue 8), in bf16: A, large-class face training; B, the CPU target's shape; C, a
# pair-wise batch of 65,536 against itself.
GPU_CASE_A = Case("class", 1024, 1_000_000, 512, "bf16")
GPU_CASE_B = Case("class", 512, 100_000, 128, "bf16")
GPU_CASE_C = Case("batch", 65_536, 65_536, 128, "bf16")


def gpu_check_grid() -> list:
    """What benchmarks/gpu_check.sh measures: cases A, B and C."""
    return [GPU_CASE_B, GPU_CASE_A, GPU_CASE_C]


def quick_grid() -> list:
    """A smoke run of a few seconds: one tiny case per label form."""
    return [Case("class", 64, 2000, 32, "fp32"), Case("pair", 64, 1024, 32, "fp32"), Case("batch", 64, 64, 32, "fp32")]


def select(cases: list, patterns: list) -> list:
    """The cases whose name contains every one of the patterns (e.g. ["class", "C100000"])."""
    return [case for case in cases if all(p in case.name for p in patterns)]


def pair_label_count(case: Case) -> int:
    """Number of distinct labels in a pair-wise case: B / 4, so each query has about N / (B / 4)
    positives in the reference set."""
    return max(case.B // 4, 2)


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Random unnormalised embeddings (B, D) and keys (N, D; none for "batch"), generated on the
    device in the case's dtype and requiring grad, and labels: class labels in [0, C), or pair-wise
    labels for both sides."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(rows):
        return torch.randn(rows, case.D, generator=generator, device=device, dtype=case.torch_dtype)

    def labels(count):
        return torch.randint(0, label_count, (count,), generator=generator, device=device)

    label_count = case.N if case.label_form == "class" else pair_label_count(case)
    inputs = {"embeddings": normal(case.B).requires_grad_(), "labels": labels(case.B)}
    if case.label_form != "batch":
        inputs["keys"] = normal(case.N).requires_grad_()
    if case.label_form == "pair":
        inputs["key_labels"] = labels(case.N)
    return inputs
