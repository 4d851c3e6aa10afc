"""Backward, step 1: H = ∂L/∂S with both inverse norms folded in, for one chunk of keys.

Grid: (key tiles of the chunk, row splits). Program (t, p) holds one BLOCK_N tile of keys and walks
the row blocks of split p: for each it recomputes the tile of S, forms G_ij = ∂L/∂s_ij = σ_i · (softmax
weight of the logit within its own log-sum-exp) · slope, and writes

  H_ij = G_ij · (1/‖q_i‖) · (1/‖k_j‖) · c      into the workspace (B × chunk, the operands' dtype),

where c is a power of two that keeps fp16 workspaces in range (1 for bf16 and fp32). With H, the two
matrix products of backward take raw operands: H · K = c·G · K̂ / ‖q_i‖ and Hᵀ · Q = c·Gᵀ · Q̂ / ‖k_j‖
(grad_keys takes the normalisation's radial part from its own product, so nothing else is summed here).
The tile is held in units of 1/‖q_i‖ (t = q_i · k̂_j; see tile.circle_epilogue), and each row's terms
of the formula (LP_i, LN_i, σ_i and the norms, folded) come ready-made from the row table that
circle_row_terms_kernel writes once, before the chunks. Class-level tiles apply the negative formula to
every key, with no labels and no masks: each row's one positive (from circle_row_terms_kernel, one
gathered dot a row) is written over them afterwards, one entry a row, and so is a zero at each row's
excluded key (circle_row_entries_kernel): no tile masks them.
With TMA the operands come through tensor descriptors and H leaves through one (h_desc); the chunk's
last partial tile runs in a launch of its own (EDGE), the only one that masks keys past N. With
RESIDENT_KEYS (a preset's choice, with TMA and D in at most two BLOCK_D chunks) the program loads its key
tile once and keeps it for the whole walk: only the rows stream, and the row loop is the one the
compiler pipelines. Without it the row loop is that loop only where D fits one chunk (tile.dot_tile's
ONE_CHUNK); otherwise the D loop inside each tile is.
A pair-wise problem sorted by label (label_order.py) runs two launches: "mixed" takes the run of row
blocks whose mixed ranges may meet the program's key tile (label_order.mixed_row_ranges), TILES
"negative" the row blocks around it (the negatives-only epilogue, no labels, no masks but EDGE's).
Every element of H has one writer: no atomics, the same bits on every run.
With LABEL_SMOOTHING, G_ij = g_i·(σ_i·weight − c)·slope: the smoothed target moves c = c_p = ε(1 − 1/C)
from the positive and c = c_n = ε/C onto every negative.
"""
import triton
import triton.language as tl

from .tile import (LOG2_E, circle_epilogue, circle_row_terms, column_labels, dot_resident, dot_tile,
                   gathered_positive, keys_in_bounds, positive_pairs, query_norms, resident_tile, row_labels, walk_at,
                   walk_span)


# The row table (circle_row_terms_kernel writes it, the tiles read it): float32, one row per query row
# (row_table_width(...) long, a power of two): circle_row_terms' seven, the row's pair-wise label (its
# int32 bits), then with label smoothing σ_i, g_i·c_p and g_i·c_n (the last two in the unit of the
# epilogue's weight, circle_row_terms). Everything a tile needs of its rows, at one address a row.
ROW_FIELDS = tl.constexpr(8)
SMOOTHING_FIELDS = tl.constexpr(3)


def row_table_width(label_smoothing: bool) -> int:
    """The row table's row length: its fields, rounded up to a power of two."""
    return triton.next_power_of_2(ROW_FIELDS.value + (SMOOTHING_FIELDS.value if label_smoothing else 0))


@triton.jit
def _load_row_terms(table_ptr, rows, B, TABLE_STRIDE: tl.constexpr, LABEL_SMOOTHING: tl.constexpr):
    """Row i's fields of the table for rows = a block of row indices, without masks: rows past B read
    row B - 1's (finite terms; those rows of the tile are never stored)."""
    row = table_ptr + tl.minimum(rows.to(tl.int32), B - 1) * TABLE_STRIDE
    terms = ()
    for field in tl.static_range(ROW_FIELDS + (SMOOTHING_FIELDS if LABEL_SMOOTHING else 0)):
        terms = terms + (tl.load(row + field),)
    return terms


@triton.jit
def _gradient(t, is_pos, terms, LABEL_SMOOTHING: tl.constexpr, DETACH_ALPHA: tl.constexpr,
              CLIP_POSITIVES: tl.constexpr):
    """H_ij·‖k_j‖ = c·G_ij/‖q_i‖ for a tile of t = q_i · k̂_j, with row i's fields of the table (terms),
    where G_ij = σ_i·w_ij·γ·slope_ij (w_ij the softmax weight of the logit within LP_i or LN_i), or with
    label smoothing G_ij = (σ_i·w_ij - g_i·c_kind)·γ·slope_ij; the row factors ride on the slope (with
    the true derivative, on the weight: the table's smoothing terms come in its unit)."""
    row = (terms[0], terms[1], terms[2], terms[3], terms[4], terms[5], terms[6])
    logit, slope = circle_epilogue(t, is_pos, row, DETACH_ALPHA, CLIP_POSITIVES)
    weight = tl.exp2(logit)
    if LABEL_SMOOTHING:
        smooth = tl.where(is_pos, terms[9][:, None], terms[10][:, None])
        return (terms[8][:, None] * weight - smooth) * slope
    return weight * slope


@triton.jit
def circle_row_terms_kernel(
    q_ptr, k_ptr, q_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr, lse_pos_ptr, lse_neg_ptr, row_scale_ptr,
    grad_rows_ptr, grad_scale_ptr, table_ptr, positive_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, margin, gamma, smooth_pos, smooth_neg,
    TABLE_STRIDE: tl.constexpr, CLASS_LEVEL: tl.constexpr, DETACH_ALPHA: tl.constexpr, CLIP_POSITIVES: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The row table of the backward (B rows of TABLE_STRIDE = row_table_width float32): circle_row_terms
    of every row (LP_i and LN_i in base 2 the offsets, σ_i·c/‖q_i‖·γ the slope's scale), its pair-wise
    label, and with label smoothing σ_i, g_i·c_p and g_i·c_n in the weight's unit (the slope's scale then
    c/‖q_i‖·γ). CLIP_POSITIVES: m < 0 with the true derivative (tile.circle_epilogue).
    Class-level keys (CLASS_LEVEL) also get each row's H_{i,a_i}·‖k_{a_i}‖ from one gathered dot product
    (its one positive, its class), which circle_row_entries_kernel writes over the tiles' negative formula
    at (i, a_i)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    norm_q, inv_norm_q = query_norms(inv_norm_q_ptr, rows, B)
    lse_pos2 = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0) * LOG2_E
    lse_neg2 = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0) * LOG2_E
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    slope_scale = inv_norm_q * tl.load(grad_scale_ptr) * gamma
    if not LABEL_SMOOTHING:
        slope_scale = slope_scale * row_scale
    terms, weight_unit = circle_row_terms(norm_q, inv_norm_q, margin, gamma * LOG2_E, lse_pos2, lse_neg2,
                                          slope_scale, DETACH_ALPHA)
    q_label = row_labels(q_label_ptr, rows, B, CLASS_LEVEL)
    if CLASS_LEVEL:  # (the tiles take no labels)
        terms = terms + (tl.zeros((BLOCK_B,), tl.float32),)
    else:
        terms = terms + (q_label.to(tl.float32, bitcast=True),)
    if LABEL_SMOOTHING:
        grad_row = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0)
        terms = terms + (row_scale, grad_row * smooth_pos * weight_unit, grad_row * smooth_neg * weight_unit)
    row = table_ptr + rows * TABLE_STRIDE
    for field in tl.static_range(len(terms)):
        tl.store(row + field, terms[field], mask=row_ok)
    if CLASS_LEVEL:
        t_pos, _ = gathered_positive(q_ptr, k_ptr, inv_norm_k_ptr, rows, q_label, B, N, D, stride_qb, stride_qd,
                                     stride_kn, stride_kd, BLOCK_B, BLOCK_D)
        g = _gradient(t_pos[:, None], True, terms, LABEL_SMOOTHING, DETACH_ALPHA, CLIP_POSITIVES)
        tl.store(positive_ptr + rows, tl.sum(g, axis=1), mask=row_ok)


@triton.jit
def circle_row_entries_kernel(
    h_ptr, q_label_ptr, excluded_key_ptr, positive_ptr, inv_norm_k_ptr, B, key_start, chunk_len, h_stride,
    POSITIVE: tl.constexpr, EXCLUDED: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """The entries of a chunk's H, one or two a row, that the tiles leave to it: POSITIVE (class-level
    keys, whose tiles write the negative formula everywhere) the row's positive, H_{i,a_i} = (its
    per-row value from circle_row_terms_kernel) · (1/‖k_{a_i}‖); EXCLUDED 0 at the row's
    excluded key (pair-wise: i itself in-batch, its slot in a memory), written last. Each where it falls
    in the chunk [key_start, key_start + chunk_len); one thread a row: every entry has one writer."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h_rows = h_ptr + rows.to(tl.int64) * h_stride
    if POSITIVE:
        label = tl.load(q_label_ptr + rows, mask=rows < B, other=-1)
        column = label - key_start
        positive = (rows < B) & (column >= 0) & (column < chunk_len)
        value = tl.load(positive_ptr + rows, mask=positive, other=0.0) * tl.load(inv_norm_k_ptr + label,
                                                                                  mask=positive, other=0.0)
        tl.store(h_rows + column, value.to(h_ptr.dtype.element_ty), mask=positive)
    if EXCLUDED:
        excluded = tl.load(excluded_key_ptr + rows, mask=rows < B, other=-1)
        column = excluded - key_start
        tl.store(h_rows + column, tl.zeros((BLOCK_B,), h_ptr.dtype.element_ty),
                 mask=(rows < B) & (excluded >= 0) & (column >= 0) & (column < chunk_len))


@triton.jit
def circle_grad_similarity_kernel(
    q_ptr, k_ptr, q_desc, k_desc, k_label_ptr, inv_norm_k_ptr, table_ptr, h_ptr, h_desc, mixed_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, key_start, h_stride, local_begin, rows_per_split,
    mixed_group,
    CLASS_LEVEL: tl.constexpr, DETACH_ALPHA: tl.constexpr, CLIP_POSITIVES: tl.constexpr, LABEL_SMOOTHING: tl.constexpr,
    TABLE_STRIDE: tl.constexpr, EDGE: tl.constexpr, TILES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, D_CHUNKS: tl.constexpr, RESIDENT_KEYS: tl.constexpr = False,
):
    split = tl.program_id(1)
    # this program's keys: one tile of the chunk, fixed for the whole program
    local0 = local_begin + tl.program_id(0).to(tl.int64) * BLOCK_N
    local = local0 + tl.arange(0, BLOCK_N)
    first_key = key_start + local0
    keys = first_key + tl.arange(0, BLOCK_N)
    inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)
    # labels: pair-wise tiles that may hold either kind (class-level positives and every excluded key are
    # written afterwards, circle_row_entries_kernel)
    pairs: tl.constexpr = not CLASS_LEVEL and TILES != "negative"
    if pairs:
        k_label = column_labels(k_label_ptr, first_key, N, BLOCK_N, False)
    if EDGE:  # the last partial tile: keys past N are no pair
        in_bounds = keys_in_bounds(first_key, N, BLOCK_N)[None, :]
    # RESIDENT_KEYS (a preset's choice; with TMA and D in at most two chunks): the key tile stays in
    # shared memory for the whole walk and only the rows stream
    resident: tl.constexpr = RESIDENT_KEYS and TMA and D_CHUNKS <= 2
    if resident:
        keys_first, keys_second = resident_tile(k_desc, first_key, BLOCK_D, D_CHUNKS)
    # this split's row blocks: all of them (TILES "all"), or (sorted problems, label_order.py) those in the
    # run of rows whose mixed ranges may meet this key tile's group of mixed_group keys ("mixed"), or the
    # others ("negative"), walked without a branch
    row_begin = split.to(tl.int64) * rows_per_split
    first, count, skip_at, skip = walk_span(mixed_ptr + 2 * (first_key // mixed_group), row_begin,
                                            tl.minimum(row_begin + rows_per_split, B), TILES)
    for step in range(0, count, BLOCK_B):
        rows_start = walk_at(first, step, skip_at, skip)
        rows = rows_start + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        terms = _load_row_terms(table_ptr, rows, B, TABLE_STRIDE, LABEL_SMOOTHING)  # the formula's row terms
        if pairs:
            q_label = terms[7].to(tl.int32, bitcast=True)
        # S tile in units of 1/‖q_i‖, recomputed: raw products on the tensor cores, the keys' norms folded in
        if resident:
            dots = dot_resident(q_desc, rows_start, keys_first, keys_second, BLOCK_B, BLOCK_N, BLOCK_D,
                                D_CHUNKS, "keys", DOT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, q_desc, k_desc, rows_start, first_key, B, N, D, stride_qb,
                            stride_qd, stride_kn, stride_kd, BLOCK_B, BLOCK_N, BLOCK_D, EVEN_D, TMA,
                            DOT_PRECISION, D_CHUNKS == 1)
        t = dots * inv_norm_k[None, :]
        if pairs:  # both kinds
            g = _gradient(t, positive_pairs(q_label, k_label, first_key, False), terms, LABEL_SMOOTHING, DETACH_ALPHA,
                          CLIP_POSITIVES)
        else:  # the negative formula on every similarity
            g = _gradient(t, False, terms, LABEL_SMOOTHING, DETACH_ALPHA, CLIP_POSITIVES)
        if EDGE:
            g = tl.where(in_bounds, g, 0.0)
        h = (g * inv_norm_k[None, :]).to(h_ptr.dtype.element_ty)
        # rows ≥ B are not stored; columns past the chunk (zeros, in the EDGE tile) land in its padding
        if TMA:  # one bulk copy, which clips the rows
            h_desc.store([tl.cast(rows_start, tl.int32), tl.cast(local0, tl.int32)], h)
        else:
            tl.store(h_ptr + rows[:, None] * h_stride + local[None, :], h, mask=row_ok[:, None])
