"""Every kernel launch the launchers make, as triton specialises it: the input of ahead-of-time compiles.

`python -m circleloss_ext.aot` compiles each `Launch` listed here with its preset from presets.py.
The argument types describe a typical large problem the way triton's JIT specialises it:
  * operands are contiguous: their stride along D is 1, which triton turns into a constexpr 1;
  * pointers (torch allocations) are 16-byte aligned, and D, the row strides (= D) and
    keys_per_split (a whole number of BLOCK_N tiles) are multiples of 16: they get tt.divisibility 16;
  * every other integer fits int32 ("i32"): even a 16M x 512 class matrix does, and the kernels
    compute row offsets in int64; B, N and R get no divisibility hint;
  * float scalars are fp32.
    (key_start and h_stride, the workspace's row stride, are multiples of the chunk alignment);
Operands and the workspace H are bf16, fp16 or fp32; class-level labels int64, pair-wise ones int32
(tile.dense_labels); norms, log-sum-exps, radial sums and
partial sums float32.
"""
from dataclasses import dataclass

import torch

from .forward import circle_forward_kernel
from .grad_keys import circle_grad_keys_kernel, key_dim_groups, key_tile
from .grad_queries import circle_grad_queries_kernel
from .grad_similarity import (circle_grad_similarity_kernel, circle_row_entries_kernel, circle_row_terms_kernel,
                              row_table_width)
from .presets import LaunchConfig, d_chunks, dot_precision, narrowed
from .row_norm import inv_norm_kernel

ANALYSIS_D = 512  # the face-training width the offline figures are read at (circleloss_ext.aot)
OPERAND_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FLOAT_SCALARS = {"margin", "gamma", "eps", "smooth_pos", "smooth_neg"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_d"}
_MULTIPLES_OF_16 = {"D", "stride_qb", "stride_kn", "stride_r", "keys_per_split", "key_start", "h_stride",
                    "rows_per_split"}
# Tile launches (label_order.tile_launches): class-level keys (rows of W), whose positives are gathered
# apart; pair-wise labels against a reference set or within the batch (exclude-self), whose tiles that
# may hold both kinds (all of an unsorted problem's, a sorted one's mixed tiles) the forward walks once
# a kind, the other masked, and the backward takes with both kinds at once; and the negatives-only tiles
# of a sorted problem (from 512 rows), which take the class-level presets. The class-level backward
# does not sort.
_PAIRWISE = {"CLASS_LEVEL": False, "EXCLUDE_KEY": False}
_EXCLUDE_SELF = {"CLASS_LEVEL": False, "EXCLUDE_KEY": True}
_FORWARD_FORMS = {  # form: (constexprs, preset)
    "class-level": ({"CLASS_LEVEL": True, "EXCLUDE_KEY": False}, "forward"),
    "class-level negative tiles": ({"CLASS_LEVEL": True, "EXCLUDE_KEY": False, "TILES": "negative"}, "forward"),
    "pair-wise negatives": (_PAIRWISE, "forward_pairwise"),
    "pair-wise positives": ({**_PAIRWISE, "KIND": "positive"}, "forward_pairwise"),
    "pair-wise exclude-self negatives": (_EXCLUDE_SELF, "forward_pairwise"),
    "pair-wise exclude-self positives": ({**_EXCLUDE_SELF, "KIND": "positive"}, "forward_pairwise"),
    "pair-wise negative tiles": ({**_EXCLUDE_SELF, "TILES": "negative"}, "forward"),
}
# A negative margin compiles its own true-derivative tiles for those that may hold both kinds
# (tile.circle_epilogue's CLIP_POSITIVES: a positive's α can then be clipped too, one compare more a
# similarity); their rows are reported with this mark and counted apart from the budget's, which is set
# at the margins the paper recommends (m ≥ 0). Tiles of one kind compile the same code at any margin.
NEGATIVE_MARGIN = "m<0"
_BACKWARD_FORMS = {  # form: (constexprs, preset, with "_full" for the true derivative); excluded keys
    # are written after the tiles (circle_row_entries_kernel), so an exclude-self problem's tiles are these
    "class-level": ({"CLASS_LEVEL": True}, "grad_similarity"),
    "pair-wise": ({"CLASS_LEVEL": False}, "grad_similarity_pairwise"),
    "pair-wise negative tiles": ({"CLASS_LEVEL": False, "TILES": "negative"}, "grad_similarity"),
}


def _mode(detach: bool, clip_positives: bool = False) -> str:
    """A launch's gradient mode as its variant names it."""
    return f"{'detach' if detach else 'full'}-alpha" + (f" {NEGATIVE_MARGIN}" if clip_positives else "")


@dataclass(frozen=True)
class Launch:
    """One specialisation of a kernel: `kernel` names its preset, `types` its runtime arguments'
    triton types, `constexprs` its constexpr arguments other than the preset's block sizes."""
    kernel: str
    fn: object
    variant: str
    dtype: torch.dtype
    types: dict
    constexprs: dict

    def launch_config(self, preset: LaunchConfig, d: int = ANALYSIS_D) -> LaunchConfig:
        """The configuration the launchers derive from `preset` for rows of d: BLOCK_D narrowed to what d
        needs (presets.tile_config), grad_keys' key tile widened where d fits one accumulator
        (grad_keys.key_tile); the preset itself at d = ANALYSIS_D."""
        return key_tile(preset, d) if self.fn is circle_grad_keys_kernel else narrowed(preset, d)

    def compile_args(self, config: LaunchConfig, tma: bool, d: int = ANALYSIS_D) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) for triton.compiler.ASTSource, with config's block sizes, for
        rows of d (a power of two from 64); tma: the tile kernels and both plain products read their
        operands through tensor descriptors (tile.operand_loads, tile.workspace_product_loads: sm_90)."""
        names = self.fn.arg_names
        constexprs = {**self.constexprs, **config.blocks}
        signature = {name: self.types.get(name, "constexpr") for name in names}
        if "HALVES" in names:  # grad_keys' accumulators at D = d, as circle_backward launches them
            halves, groups = key_dim_groups(d, config.blocks["BLOCK_D"])
            constexprs.update(HALVES=halves, FINISH=groups == 1)
        if "D_CHUNKS" in names:  # the tile kernels: how many BLOCK_D chunks D = d takes (at most 3)
            constexprs["D_CHUNKS"] = d_chunks(d, config)
            for held in {"RESIDENT_KEYS", "RESIDENT_ROWS"} & set(names):  # the presets' option, off by default
                constexprs[held] = config.blocks.get(held, False)
        if "TMA" in names:
            constexprs["TMA"] = tma
            if "EVEN_D" in names:
                constexprs["EVEN_D"] = not tma  # pointers: d is a multiple of every BLOCK_D it is given
            blocks = {"q_desc": ("BLOCK_B", "BLOCK_D"), "k_desc": ("BLOCK_N", "BLOCK_D"),
                      "h_desc": ("BLOCK_B", "BLOCK_N")}
            for name in set(blocks) & set(names):
                if tma:
                    block = [config.blocks[size] for size in blocks[name]]
                    signature[name] = f"tensordesc<{self.types['k_ptr'][1:]}{block}>"  # (operands, H: one dtype)
                else:
                    constexprs[name] = None
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if name in _MULTIPLES_OF_16 or signature[name].startswith("*")}
        return signature, constexprs, attrs


def _launch(kernel, fn, dtype, variant, pointers, ones=(), **constexprs) -> Launch:
    """A Launch of fn: pointer arguments point to float32 unless `pointers` says otherwise, the unit
    strides and the arguments in `ones` are specialised to 1, the other integers are i32."""
    ones = (_UNIT_STRIDES | set(ones)) & set(fn.arg_names)
    types = {}
    for p in fn.params:
        if p.is_constexpr or p.name in ones or p.name.endswith("_desc"):  # descriptors: compile_args
            continue
        if p.name.endswith("_ptr"):
            types[p.name] = "*" + pointers.get(p.name, "fp32")
        else:
            types[p.name] = "fp32" if p.name in _FLOAT_SCALARS else "i32"
    return Launch(kernel, fn, f"{OPERAND_TYPES[dtype]} {variant}".rstrip(), dtype, types,
                  {**dict.fromkeys(ones, 1), **constexprs})


def _label_types(circle: dict, flags: dict) -> dict:
    """The tile kernels' argument types for a label form: class-level labels index keys (int64, compared
    as int32); pair-wise ones are dense int32 (tile.dense_labels)."""
    labels = "i64" if flags["CLASS_LEVEL"] else "i32"
    return {**circle, "q_label_ptr": labels, "k_label_ptr": labels, "mixed_ptr": "i32"}


def launches(dtypes=tuple(OPERAND_TYPES)) -> list[Launch]:
    """Every launch the package makes with operands of the given dtypes (fp32 at torch's default
    matmul precision, "highest")."""
    result = []
    for dtype in dtypes:
        x = OPERAND_TYPES[dtype]
        circle = {"q_ptr": x, "k_ptr": x, "q_label_ptr": "i64", "k_label_ptr": "i64", "excluded_key_ptr": "i64"}
        precision = dot_precision(dtype)
        result.append(_launch("inv_norm", inv_norm_kernel, dtype, "", {"x_ptr": x}))
        for form, (flags, preset) in _FORWARD_FORMS.items():
            result.append(_launch(preset, circle_forward_kernel, dtype, form, _label_types(circle, flags),
                                  DOT_PRECISION=precision, TRACK_TOP1=False, NEGATIVE_SUM=False, EDGE=False,
                                  **{"TILES": "all", "KIND": "negative", **flags}))
        for form, (flags, preset) in _BACKWARD_FORMS.items():
            for detach, clip_positives in ((True, False), (False, False), (False, True)):
                if clip_positives and (flags["CLASS_LEVEL"] or "TILES" in flags):  # one kind: no other code
                    continue
                result.append(_launch(preset + ("" if detach else "_full"), circle_grad_similarity_kernel, dtype,
                                      f"{form} {_mode(detach, clip_positives)}",
                                      {**_label_types(circle, flags), "h_ptr": x},
                                      DETACH_ALPHA=detach, CLIP_POSITIVES=clip_positives, LABEL_SMOOTHING=False,
                                      TABLE_STRIDE=row_table_width(False), EDGE=False, DOT_PRECISION=precision,
                                      **{"TILES": "all", **flags}))
        for form, detach, clip_positives in (("class-level", True, False), ("class-level", False, False),
                                             ("class-level", False, True), ("pair-wise", True, False)):
            result.append(_launch("row_terms", circle_row_terms_kernel, dtype,
                                  f"{form} {_mode(detach, clip_positives)}",
                                  _label_types(circle, {"CLASS_LEVEL": form == "class-level"}),
                                  CLASS_LEVEL=form == "class-level", DETACH_ALPHA=detach, CLIP_POSITIVES=clip_positives,
                                  LABEL_SMOOTHING=False, TABLE_STRIDE=row_table_width(False)))
        result.append(_launch("row_entries", circle_row_entries_kernel, dtype, "class-level",
                              {"h_ptr": x, "q_label_ptr": "i64"}, POSITIVE=True, EXCLUDED=False))
        result.append(_launch("row_entries", circle_row_entries_kernel, dtype, "pair-wise exclude-self",
                              {"h_ptr": x, "excluded_key_ptr": "i64"}, POSITIVE=False, EXCLUDED=True))
        result.append(_launch("grad_queries", circle_grad_queries_kernel, dtype, "", {"h_ptr": x, "k_ptr": x},
                              DOT_PRECISION=precision))
        result.append(_launch("grad_keys", circle_grad_keys_kernel, dtype, "",
                              {"h_ptr": x, "q_ptr": x, "k_ptr": x, "out_ptr": x}, DOT_PRECISION=precision))
    return result
