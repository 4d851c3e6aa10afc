"""Backward launcher: H = ∂L/∂S (norms folded in) one chunk of keys at a time, then two plain products.

First a table of each row's terms of the formula (circle_row_terms_kernel: the log-sum-exps, σ_i and
the norms folded into the constants the tiles' epilogue takes), which also gives class-level keys each
row's positive (O(B·D)). Then, for each chunk of keys [k0, k0 + chunk):
  1. grad_similarity: recompute S, write H (B × chunk, the operands' dtype); class-level tiles write the
     negative formula everywhere, and circle_row_entries_kernel then writes each row's positive over it,
     and a zero at each row's excluded key (pair-wise);
  2. grad_queries: R += H · K_chunk (float32 partial sums, added in a fixed order);
  3. grad_keys: P = Hᵀ · Q and ∂L/∂K_chunk = (P_j - ‖k_j‖⁻² ρ_j k_j) / c with ρ_j = k_j · P_j, written in
     K's dtype (D wider than grad_keys' accumulators: P in float32, finished here).
Then ∂L/∂q_i = R_i / c - ‖q_i‖⁻² (q_i · R_i / c) q_i (B × D, in float32, cast once).

The workspace (H, and P where D is that wide) is the only memory that grows with B × N; the chunk is
the largest that fits the workspace limit (set_workspace_limit), so memory stays bounded at any N.
"""
import math

import torch
import triton

from .grad_keys import circle_grad_keys_kernel, key_dim_groups, key_loads, key_tile
from .grad_queries import circle_grad_queries_kernel, product_loads
from .grad_similarity import (circle_grad_similarity_kernel, circle_row_entries_kernel, circle_row_terms_kernel,
                              row_table_width)
from .label_order import label_order, mixed_group, tile_launches
from .presets import d_chunks, dot_precision, preset, splits_to_fill, tile_config
from .tile import edge_ranges, operand_loads, problem_arguments, workspace_descriptor

DEFAULT_WORKSPACE_BYTES = 1 << 30
_workspace_bytes = DEFAULT_WORKSPACE_BYTES


def set_workspace_limit(nbytes: int) -> None:
    """Bytes the Triton backward may hold for its B × chunk workspace (default 1 GiB). A smaller limit
    means more, narrower chunks (the products get less efficient below a few thousand keys a chunk);
    at least one tile column of keys is always used, whatever the limit."""
    global _workspace_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"workspace limit must be a positive number of bytes, got {nbytes!r}")
    _workspace_bytes = nbytes


def workspace_limit() -> int:
    return _workspace_bytes


def chunk_keys(B: int, N: int, D: int, h_dtype: torch.dtype, align: int, keep_product: bool) -> int:
    """Keys per chunk: a multiple of `align` whose workspace (B × chunk of H and, where grad_keys' product
    is kept, chunk × D float32 of it and of the keys it is finished with) fits the limit; never more than
    N needs."""
    per_key = B * torch.empty((), dtype=h_dtype).element_size() + (D * 8 if keep_product else 0)
    chunk = max(align, _workspace_bytes // per_key // align * align)
    return min(chunk, triton.cdiv(N, align) * align)


# fp16 has 5 exponent bits: H is scaled by a power of two c so that its largest possible entry is
# below 2^14. |G_ij| ≤ σ_i · |slope| and |slope| ≤ γ(4 + |m|) for cosines in [-1, 1] (5 + |m| leaves room
# for rounding): entries below the bound by more than 2^38 flush to zero, a relative 4e-12 of the
# largest. bf16 and fp32 share fp32's exponent range and use c = 1.
def _grad_scale(h_dtype, row_scale, grad_rows, smoothing, inv_norm_q, inv_norm_k, margin, gamma) -> torch.Tensor:
    one = torch.ones(1, device=row_scale.device, dtype=torch.float32)
    if h_dtype != torch.float16:
        return one
    row_bound = row_scale.abs() + grad_rows.abs() * smoothing  # |σ_i·weight - c| ≤ σ_i + c, c ≤ ε
    bound = (row_bound * inv_norm_q).amax() * inv_norm_k.amax() * (gamma * (5.0 + abs(margin)))
    exponent = torch.floor(14.0 - torch.log2(bound)).clamp(-100.0, 100.0)
    return one * torch.exp2(exponent)


def circle_backward(grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k,
                    lse_pos, lse_neg, margin, gamma, excluded_keys, detach_alpha, need_queries, need_keys,
                    smooth_pos=0.0, smooth_neg=0.0):
    """(∂L/∂queries, ∂L/∂keys) in the inputs' dtypes (None where not needed).

    grad_rows: float32 (B,) upstream gradient g_i of each row loss L_i = softplus(LP_i + LN_i)
    - smooth_pos·LP_i - smooth_neg·V_i (label smoothing: V_i the sum of the row's negative logits).
    """
    # pair-wise problems are sorted as the forward sorted them (label_order.py: most tiles then hold
    # negatives only) and their gradients put back at the end; class-level tiles are all negatives-only
    order = label_order(query_labels, key_labels) if key_labels is not None else None
    if order is not None:
        queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys = order.sort(
            queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys)
        grad_rows, lse_pos, lse_neg = grad_rows[order.rows], lse_pos[order.rows], lse_neg[order.rows]
    problem = problem_arguments(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                                excluded_keys)
    B, N, D = problem["B"], problem["N"], problem["D"]
    row_scale = torch.sigmoid(lse_pos + lse_neg) * grad_rows  # σ_i; 0 for rows without a loss
    h_dtype = keys.dtype
    smoothing = smooth_pos != 0.0 or smooth_neg != 0.0
    grad_scale = _grad_scale(h_dtype, row_scale, grad_rows, max(abs(smooth_pos), abs(smooth_neg)), inv_norm_q,
                             inv_norm_k, margin, gamma)
    # class-level keys with α detached (face training's default), with the true derivative, and pair-wise
    # tiles that may hold both kinds have their presets; a sorted problem's negatives-only tiles take the
    # class-level ones
    class_level = tile_config("grad_similarity" if detach_alpha else "grad_similarity_full", queries)
    mixed_config = class_level if key_labels is None else tile_config(
        "grad_similarity_pairwise" if detach_alpha else "grad_similarity_pairwise_full", queries)
    # the tiles leave excluded keys to circle_row_entries_kernel: they neither mask them nor widen the
    # mixed ranges for them
    kinds, mixed = tile_launches(order, problem, None, class_level, mixed_config, split_kinds=False, walk_rows=True)
    group = mixed_group(class_level, mixed_config) if order is not None else 1
    tile_problem = {k: v for k, v in problem.items()
                    if k not in ("excluded_key_ptr", "EXCLUDE_KEY", "q_label_ptr", "inv_norm_q_ptr", "margin", "gamma")}
    entries_cfg = tile_config("row_entries", queries)
    queries_cfg = tile_config("grad_queries", queries)
    keys_cfg = key_tile(preset("grad_keys", queries), D)
    # grad_similarity splits the rows as far as it takes N's key tiles to fill the device
    launches = []
    for tiles, _, cfg in kinds:  # (class-level tiles take the negatives, pair-wise mixed ones both kinds)
        row_splits, rows_per_split = splits_to_fill(B, triton.cdiv(N, cfg.blocks["BLOCK_N"]), cfg.blocks["BLOCK_B"],
                                                    queries)
        launches.append((tiles, cfg, row_splits, rows_per_split))
    halves, key_groups = key_dim_groups(D, keys_cfg.blocks["BLOCK_D"])
    finish_keys = key_groups == 1  # grad_keys finishes ∂L/∂K itself; otherwise its float32 product is kept
    align = math.lcm(*(cfg.blocks["BLOCK_N"] for _, _, cfg in kinds), queries_cfg.blocks["BLOCK_N"],
                     keys_cfg.blocks["BLOCK_N"])
    chunk = chunk_keys(B, N, D, h_dtype, align, need_keys and not finish_keys)
    device = queries.device
    h = torch.empty(B, chunk, device=device, dtype=h_dtype)
    product = torch.empty(chunk if need_keys and not finish_keys else 0, D, device=device, dtype=torch.float32)
    raw_q = torch.zeros(B, D, device=device, dtype=torch.float32) if need_queries else None
    grad_k = torch.empty(N, D, device=device, dtype=keys.dtype) if need_keys else None
    precision = dot_precision(h_dtype)
    q_tiles = triton.cdiv(B, queries_cfg.blocks["BLOCK_B"]) * triton.cdiv(D, queries_cfg.blocks["BLOCK_D"])
    if need_queries:  # R's partial sums: as many splits as the widest chunk (the first) takes
        max_splits, _ = splits_to_fill(min(chunk, N), q_tiles, queries_cfg.blocks["BLOCK_N"], queries)
        partials = torch.empty(max_splits, B, D, device=device, dtype=torch.float32)
    # the formula's row terms, ready-made for the tiles (and class-level keys' one positive a row: its
    # H_{i,a_i}·‖k_{a_i}‖, written over the tiles per chunk)
    table = torch.empty(B, row_table_width(smoothing), device=device, dtype=torch.float32)
    clip_positives = not detach_alpha and margin < 0  # (tile.circle_epilogue: only then can α^p be clipped)
    positive = torch.empty(B if key_labels is None else 0, device=device, dtype=torch.float32)
    terms_cfg = tile_config("row_terms", queries)
    circle_row_terms_kernel[(triton.cdiv(B, terms_cfg.blocks["BLOCK_B"]),)](
        q_ptr=queries, k_ptr=keys, q_label_ptr=problem["q_label_ptr"], inv_norm_q_ptr=inv_norm_q,
        inv_norm_k_ptr=inv_norm_k, lse_pos_ptr=lse_pos, lse_neg_ptr=lse_neg, row_scale_ptr=row_scale,
        grad_rows_ptr=grad_rows, grad_scale_ptr=grad_scale, table_ptr=table, positive_ptr=positive, B=B, N=N, D=D,
        stride_qb=queries.stride(0), stride_qd=queries.stride(1), stride_kn=keys.stride(0),
        stride_kd=keys.stride(1), margin=margin, gamma=gamma, smooth_pos=smooth_pos, smooth_neg=smooth_neg,
        CLASS_LEVEL=key_labels is None, DETACH_ALPHA=detach_alpha, CLIP_POSITIVES=clip_positives,
        LABEL_SMOOTHING=smoothing, TABLE_STRIDE=table.stride(0), **terms_cfg.kwargs())
    loads = {tiles: operand_loads(queries, keys, cfg) for tiles, cfg, *_ in launches}
    h_descs = {tiles: workspace_descriptor(h, cfg) if loads[tiles]["TMA"] else None for tiles, cfg, *_ in launches}
    for key_start in range(0, N, chunk):
        chunk_len = min(chunk, N - key_start)
        span = dict(key_start=key_start, chunk_len=chunk_len, h_stride=chunk)
        for tiles, cfg, row_splits, rows_per_split in launches:
            block_n = cfg.blocks["BLOCK_N"]
            for local_begin, local_end, edge in edge_ranges(chunk_len, block_n):
                circle_grad_similarity_kernel[(triton.cdiv(local_end - local_begin, block_n), row_splits)](
                    **tile_problem, table_ptr=table, h_ptr=h, h_desc=h_descs[tiles], mixed_ptr=mixed,
                    mixed_group=group, key_start=key_start, h_stride=chunk, local_begin=local_begin,
                    rows_per_split=rows_per_split, DETACH_ALPHA=detach_alpha, CLIP_POSITIVES=clip_positives,
                    LABEL_SMOOTHING=smoothing, EDGE=edge, TABLE_STRIDE=table.stride(0), TILES=tiles,
                    D_CHUNKS=d_chunks(D, cfg), **loads[tiles], **cfg.kwargs())
        if key_labels is None or problem["EXCLUDE_KEY"]:  # the entries written over the tiles
            circle_row_entries_kernel[(triton.cdiv(B, entries_cfg.blocks["BLOCK_B"]),)](
                h_ptr=h, q_label_ptr=problem["q_label_ptr"], excluded_key_ptr=problem["excluded_key_ptr"],
                positive_ptr=positive, inv_norm_k_ptr=inv_norm_k, B=B, **span, POSITIVE=key_labels is None,
                EXCLUDED=problem["EXCLUDE_KEY"], **entries_cfg.kwargs())
        if need_queries:
            splits, keys_per_split = splits_to_fill(chunk_len, q_tiles, queries_cfg.blocks["BLOCK_N"], queries)
            partial = partials[:splits]
            grid = (triton.cdiv(B, queries_cfg.blocks["BLOCK_B"]), triton.cdiv(D, queries_cfg.blocks["BLOCK_D"]),
                    splits)
            circle_grad_queries_kernel[grid](
                h_ptr=h, k_ptr=keys, partial_ptr=partial, B=B, D=D, stride_kn=keys.stride(0),
                stride_kd=keys.stride(1), **span, keys_per_split=keys_per_split, DOT_PRECISION=precision,
                **product_loads(h, keys, key_start, chunk_len, queries_cfg), **queries_cfg.kwargs())
            raw_q += partial.sum(dim=0)
        if need_keys:
            grid = (triton.cdiv(chunk_len, keys_cfg.blocks["BLOCK_N"]), key_groups)
            circle_grad_keys_kernel[grid](
                h_ptr=h, q_ptr=queries, k_ptr=keys, inv_norm_k_ptr=inv_norm_k, grad_scale_ptr=grad_scale,
                out_ptr=grad_k, product_ptr=product, B=B, D=D, stride_qb=queries.stride(0),
                stride_qd=queries.stride(1), stride_kn=keys.stride(0), stride_kd=keys.stride(1), **span,
                HALVES=halves, FINISH=finish_keys, DOT_PRECISION=precision,
                **key_loads(h, queries, chunk_len, keys_cfg), **keys_cfg.kwargs())
            if not finish_keys:  # the normalisation backward of the chunk's keys, on P in place
                p, k = product[:chunk_len], keys[key_start:key_start + chunk_len].float()
                chunk_norms = inv_norm_k[key_start:key_start + chunk_len]
                radial_coef = torch.linalg.vecdot(p, k) * chunk_norms * chunk_norms  # ‖k_j‖⁻² ρ_j
                p.addcmul_(k, radial_coef[:, None], value=-1.0).div_(grad_scale)
                grad_k[key_start:key_start + chunk_len] = p.to(keys.dtype)
    grad_q = None
    if need_queries:  # normalisation backward of the queries: B × D, in float32
        raw_q /= grad_scale
        q = queries.float()
        radial_q = (raw_q * q).sum(dim=1) * inv_norm_q * inv_norm_q
        grad_q = (raw_q - radial_q[:, None] * q).to(queries.dtype)
    if order is not None:
        grad_q = order.unsort_rows(grad_q) if need_queries else grad_q
        grad_k = order.unsort_keys(grad_k) if need_keys else grad_k
    return grad_q, grad_k
