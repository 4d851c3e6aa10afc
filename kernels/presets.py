"""Launch configurations, one preset per architecture family and operand width.

`python -m circleloss_ext.aot` compiles every entry here for sm_80 and sm_90 and reports registers,
spills, shared memory and instruction issue per tensor-core cycle; each family's comment says whether
its presets were measured on a GPU (benchmarks/tune_presets.py) or chosen from those figures.
The interpreter preset uses small tiles so that CPU tests cross tile, chunk and split boundaries.
"""
import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class LaunchConfig:
    blocks: dict  # tile sizes (BLOCK_*) and the kernel's other tuning constexprs
    num_warps: int = 4
    num_stages: int = 2

    def options(self) -> dict:
        """The compiler's options for a launch. Floating-point contraction (a·b + c as one fma) is asked
        for, not left to triton's default, which triton 3.10 turns off: the epilogues are written for fma
        (and the offline figures read with it); their one place where contraction would change a result,
        the true derivative's clipping, is a compare and a select."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}

    def kwargs(self) -> dict:
        return {**self.blocks, **self.options()}

    def label(self) -> str:
        sizes = " ".join(f"{k.removeprefix('BLOCK_')}={int(v)}" for k, v in self.blocks.items())
        return f"{sizes} w={self.num_warps} s={self.num_stages}"


def _tiles(b, n, d, warps, stages, **constexprs):
    return LaunchConfig({"BLOCK_B": b, "BLOCK_N": n, "BLOCK_D": d, **constexprs}, warps, stages)


_ELEMENTWISE = {
    "inv_norm": LaunchConfig({"BLOCK_R": 16, "BLOCK_D": 128}, 4, 1),
    "row_terms": LaunchConfig({"BLOCK_B": 16, "BLOCK_D": 128}, 4, 1),
    "row_entries": LaunchConfig({"BLOCK_B": 128}, 4, 1),
}

# (arch family, operand width) -> kernel -> config. "16" covers bf16 and fp16, "32" fp32.
# forward (class-level; forward_pairwise for pair-wise labels, whose epilogue is twice as long) and
# grad_similarity tile S (BLOCK_B × BLOCK_N, D in BLOCK_D chunks); grad_similarity is the class-level
# tile with α detached (face training's default), grad_similarity_full the class-level true derivative,
# grad_similarity_pairwise and grad_similarity_pairwise_full the pair-wise tiles that may hold both
# kinds. grad_queries is the product H · K (BLOCK_B × BLOCK_D outputs, BLOCK_N keys a step); grad_keys
# is Hᵀ · Q (BLOCK_N keys × one or two accumulators of BLOCK_D dims, BLOCK_B rows a step): D up to
# 2·BLOCK_D is finished in the kernel (grad_keys.key_dim_groups). tile_config narrows BLOCK_D to what D
# needs. A grad_similarity preset may set RESIDENT_KEYS, a forward one RESIDENT_ROWS: each program then
# holds the tile it owns (its keys; its rows) in shared memory for its whole walk over the other side (with
# tensor descriptors, D in at most two BLOCK_D chunks), so that only the other side streams and the walk
# is the loop the compiler pipelines (tile.resident_tile). Offline at D = 128 (sm_90 bf16) the forward
# reads 1.44 held (128 × 256 × 64 s2) against the preset's 1.69 (its 64-wide chunks keep a D loop) and
# 1.42 in one 128-wide chunk (no D loop, tile.dot_tile's ONE_CHUNK); grad_similarity 1.33 held (64 × 128
# × 128 s3) against 1.38 in its one chunk. No preset sets either until a GPU has timed them
# (benchmarks/tune_presets.py lists the candidates).
PRESETS = {
    ("sm90", "16"): {  # measured: benchmarks/tune_presets.py on an H100 (results/nvidia-h100-*-tune_presets.txt:
        # forward 128 × 256 × 64 s3 and grad_keys s3 took 0.6 and 1.2 ms off case A, 0.6 and 3.7 ms off case
        # C) and before that on an H200; the other tile shapes chosen offline for the TMA kernels (aot,
        # triton 3.9 / 3.6, no spills; the H100 timed them level with the candidates). issue_to_mma:
        # forward 0.56 / 0.58 (negatives-only tiles 0.49 / 0.49; the measured-faster preset reads higher
        # than 128 × 256 × 128's 0.48, its D loop being twice as long), forward_pairwise (one kind a launch)
        # 0.48-0.55 / 0.48-0.62, grad_similarity 0.46 / 0.44, grad_similarity_full 0.49 / 0.47,
        # grad_similarity_pairwise 0.59 / 0.57, grad_similarity_pairwise_full 0.59 / 0.57 (64 × 128
        # since the row table; 64 × 64, 1.02 / 1.00, while 64 × 128 spilled under 3.6; 0.80 / 0.77 at
        # m < 0, whose positives take a compare too), grad_queries 0.19 / 0.19 and grad_keys 0.25 / 0.25
        # (operands by TMA; 0.57 / 0.72 and 0.44 / 0.43 through pointers). A sorted pair-wise problem's
        # negatives-only tiles (label_order.py) take the class-level presets (backward 0.47 / 0.44 and
        # 0.50 / 0.47). forward and forward_pairwise share BLOCK_B, as
        # the grad_similarity presets do.
        "forward": _tiles(128, 256, 64, 8, 3),
        "forward_pairwise": _tiles(128, 256, 128, 8, 2),
        "grad_similarity": _tiles(64, 128, 256, 4, 2),
        "grad_similarity_full": _tiles(64, 128, 256, 4, 2),
        "grad_similarity_pairwise": _tiles(64, 128, 256, 4, 2),
        "grad_similarity_pairwise_full": _tiles(64, 128, 256, 4, 2),
        "grad_queries": _tiles(128, 64, 256, 8, 3),
        "grad_keys": _tiles(64, 64, 256, 8, 3),
        **_ELEMENTWISE,
    },
    ("sm90", "32"): {  # 3xTF32 holds high and low operand halves in registers: smaller tiles than 16-bit
        "forward": _tiles(128, 64, 32, 8, 3),
        "forward_pairwise": _tiles(128, 64, 32, 8, 3),
        "grad_similarity": _tiles(64, 64, 32, 4, 3),
        "grad_similarity_full": _tiles(64, 64, 32, 4, 3),
        "grad_similarity_pairwise": _tiles(64, 64, 32, 4, 3),
        "grad_similarity_pairwise_full": _tiles(64, 64, 32, 4, 3),
        "grad_queries": _tiles(64, 32, 64, 4, 3),
        "grad_keys": _tiles(32, 64, 64, 4, 3),
        **_ELEMENTWISE,
    },
    ("sm80", "16"): {
        "forward": _tiles(128, 128, 32, 8, 3),
        "forward_pairwise": _tiles(128, 128, 32, 8, 3),
        "grad_similarity": _tiles(128, 64, 64, 8, 2),
        "grad_similarity_full": _tiles(128, 64, 64, 8, 2),
        "grad_similarity_pairwise": _tiles(128, 64, 64, 8, 2),
        "grad_similarity_pairwise_full": _tiles(128, 64, 64, 8, 2),
        "grad_queries": _tiles(128, 32, 128, 8, 3),
        "grad_keys": _tiles(32, 64, 256, 8, 3),
        **_ELEMENTWISE,
    },
    ("sm80", "32"): {
        "forward": _tiles(128, 64, 32, 8, 3),
        "forward_pairwise": _tiles(128, 64, 32, 8, 3),
        "grad_similarity": _tiles(32, 64, 16, 4, 3),
        "grad_similarity_full": _tiles(32, 64, 16, 4, 3),
        "grad_similarity_pairwise": _tiles(32, 64, 16, 4, 3),
        "grad_similarity_pairwise_full": _tiles(32, 64, 16, 4, 3),
        "grad_queries": _tiles(64, 16, 64, 4, 3),
        "grad_keys": _tiles(16, 64, 64, 4, 3),
        **_ELEMENTWISE,
    },
}
_INTERPRETER = {
    "forward": _tiles(16, 32, 16, 4, 1),
    "forward_pairwise": _tiles(16, 32, 16, 4, 1),
    "grad_similarity": _tiles(16, 32, 16, 4, 1),
    "grad_similarity_full": _tiles(16, 32, 16, 4, 1),
    "grad_similarity_pairwise": _tiles(16, 32, 16, 4, 1),
    "grad_similarity_pairwise_full": _tiles(16, 32, 16, 4, 1),
    "grad_queries": _tiles(16, 32, 16, 4, 1),
    "grad_keys": _tiles(16, 32, 16, 4, 1),
    "inv_norm": LaunchConfig({"BLOCK_R": 16, "BLOCK_D": 16}, 4, 1),
    "row_terms": LaunchConfig({"BLOCK_B": 16, "BLOCK_D": 16}, 4, 1),
    "row_entries": LaunchConfig({"BLOCK_B": 16}, 4, 1),
}
# Programs to aim for per launch, as a multiple of the SM count (the interpreter: a fixed small number,
# enough to exercise several key splits).
_WAVES = 4
_INTERPRETER_PROGRAMS = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The sm_90 presets take up to 99 KB of shared memory per block: devices that offer less (sm_80's
# consumer parts, sm_120's 99 KB) get the sm_80 presets (at most 49 KB).
_SM90_SHARED_BYTES = 200 * 1024
# What the offline compiles of aot.py assume for their targets (A100: 163 KB, H100: 227 KB per block).
AOT_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}


def arch_family(major: int, shared_bytes_per_block: int) -> str:
    """The preset family for a device: tensor-core dots need sm_80 or newer (bf16 and tf32 operands)."""
    if major < 8:
        raise RuntimeError(f"backend='triton' needs an NVIDIA GPU of compute capability 8.0 or newer (bf16 and "
                           f"tf32 tensor cores); this one is {major}.x: use backend='reference'")
    return "sm90" if major >= 9 and shared_bytes_per_block >= _SM90_SHARED_BYTES else "sm80"


def tma_allowed(x: torch.Tensor) -> bool:
    """Whether tile kernels may read x's operands through tensor descriptors: on sm_90-family devices (the
    copy engine, TMA) and under the interpreter (which emulates them, so CPU tests run that path)."""
    if interpreting():
        return True
    return _family(x) == "sm90"


def operand_width(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def preset(kernel: str, x: torch.Tensor) -> LaunchConfig:
    """The preset of `kernel` for operands like x, as the table holds it."""
    return _INTERPRETER[kernel] if interpreting() else PRESETS[(_family(x), operand_width(x.dtype))][kernel]


def narrowed(config: LaunchConfig, D: int) -> LaunchConfig:
    """config with its BLOCK_D no wider than rows of D need (the next power of two, at least 16): a
    D = 128 problem does not pay for 256-wide chunks of zeros."""
    depth = max(16, triton.next_power_of_2(D))
    if config.blocks.get("BLOCK_D", 0) <= depth:
        return config
    return LaunchConfig({**config.blocks, "BLOCK_D": depth}, config.num_warps, config.num_stages)


def tile_config(kernel: str, x: torch.Tensor) -> LaunchConfig:
    """The preset of `kernel` for operands like x (rows of D = x.shape[1]), narrowed to D."""
    return narrowed(preset(kernel, x), x.shape[1])


def d_chunks(D: int, config: LaunchConfig) -> int:
    """The tile kernels' D_CHUNKS: how many BLOCK_D chunks rows of D take, counted up to 3 (a tile is
    held whole, RESIDENT_KEYS / RESIDENT_ROWS, only in one or two)."""
    return min(triton.cdiv(D, config.blocks["BLOCK_D"]), 3)


def _family(x: torch.Tensor) -> str:
    major, _ = torch.cuda.get_device_capability(x.device)
    properties = torch.cuda.get_device_properties(x.device)
    shared = getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)
    return arch_family(major, shared)


def target_programs(x: torch.Tensor) -> int:
    if interpreting():
        return _INTERPRETER_PROGRAMS
    return _WAVES * torch.cuda.get_device_properties(x.device).multi_processor_count


def splits_to_fill(length: int, other_blocks: int, block: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, per_split): a range of `length` split into whole blocks of `block` so that splits ×
    other_blocks programs fill the device (target_programs); per_split is a multiple of block."""
    blocks = triton.cdiv(length, block)
    splits = max(1, min(blocks, triton.cdiv(target_programs(x), other_blocks)))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(length, per_split), per_split


# fp32 operands follow torch.get_float32_matmul_precision(), except that "high" keeps 3xTF32: one TF32
# product puts an error of ~1e-3 into s, which γ amplifies (a logit moves by ~2γ·1e-3 ≈ 0.5 at γ = 256):
# measured on an H200, TF32 gave gradients 15% off (3xTF32: 6e-5), so only "medium", which accepts
# bf16-level matmuls, gets TF32.
FP32_DOT_PRECISION = {"highest": "tf32x3", "high": "tf32x3", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of dtype: 16-bit ones are exact products; fp32 ones follow
    FP32_DOT_PRECISION. Under the interpreter bf16 products go through float32 (see tile.matmul)."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32:
        return FP32_DOT_PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"
