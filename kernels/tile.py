"""The pieces every Circle Loss kernel shares: one similarity tile and its epilogue.

Symbols follow docs/design.md: queries q_i with labels a_i, keys k_j with labels b_j,
s_ij = q̂_i · k̂_j, margin m, scale γ. The epilogue works on t_ij = q_i · k̂_j (s never formed) and gives
logits in the caller's units minus a per-row offset: the kernels keep their log-sum-exps in base 2
(γ·log2 e), so each exponential is one exp2 of the epilogue's output.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .presets import dot_precision, tma_allowed

LOG2_E = tl.constexpr(1.4426950408889634)
LN_2 = tl.constexpr(0.6931471805599453)


@triton.jit
def matmul(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot(a, b) + acc with float32 accumulation.

    DOT_PRECISION "upcast" multiplies in float32: the Triton interpreter multiplies the bit patterns
    of bfloat16 operands instead of their values, so its bf16 launches use it (presets.dot_precision).
    """
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dot_tile(q_ptr, k_ptr, q_desc, k_desc, row0, key0, B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
             TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """q_i · k_j for the BLOCK_B × BLOCK_N tile of raw (unnormalised) rows i = row0 + [0, BLOCK_B) and
    keys j = key0 + [0, BLOCK_N), in float32.

    TMA: the operands come through tensor descriptors (q_desc, k_desc: blocks of BLOCK_B × BLOCK_D and
    BLOCK_N × BLOCK_D), one bulk copy per operand and D chunk, with rows ≥ B, keys ≥ N and dims ≥ D read
    as zeros. ONE_CHUNK (the caller's choice where D fits one BLOCK_D chunk, presets.d_chunks): no D
    loop, so that the caller's walk over tiles is the loop the compiler pipelines (it issues the next
    tile's copies within this one's iteration) and the product starts from a constant zero (the
    accumulator is not zeroed first); 0.2 less issue per tensor-core cycle at D = 128 offline.
    Otherwise through pointers: rows ≥ B and keys ≥ N read rows i mod B and j mod N (in bounds, no masks
    in the loop); EVEN_D: BLOCK_D divides D, so the D loop needs no mask either.
    Either way the caller masks what rows ≥ B and keys ≥ N produce.
    """
    tl.assume(D > 0)  # (validated) the D loop runs: no second, zero-trip path with its own zeroed tile
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if TMA and ONE_CHUNK:
        q = q_desc.load([tl.cast(row0, tl.int32), 0])
        k = k_desc.load([tl.cast(key0, tl.int32), 0])
        acc = matmul(q, tl.trans(k), acc, DOT_PRECISION)
    elif TMA:
        for d0 in range(0, D, BLOCK_D):
            q = q_desc.load([tl.cast(row0, tl.int32), d0])
            k = k_desc.load([tl.cast(key0, tl.int32), d0])
            acc = matmul(q, tl.trans(k), acc, DOT_PRECISION)
    else:
        rows = (row0 + tl.arange(0, BLOCK_B)) % B
        keys = (key0 + tl.arange(0, BLOCK_N)) % N
        q_ptrs = q_ptr + rows[:, None] * stride_qb + tl.arange(0, BLOCK_D)[None, :] * stride_qd
        k_ptrs = k_ptr + keys[:, None] * stride_kn + tl.arange(0, BLOCK_D)[None, :] * stride_kd
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                q = tl.load(q_ptrs)
                k = tl.load(k_ptrs)
            else:
                in_d = (d0 + tl.arange(0, BLOCK_D) < D)[None, :]
                q = tl.load(q_ptrs, mask=in_d, other=0.0)
                k = tl.load(k_ptrs, mask=in_d, other=0.0)
            acc = matmul(q, tl.trans(k), acc, DOT_PRECISION)
            q_ptrs += BLOCK_D * stride_qd
            k_ptrs += BLOCK_D * stride_kd
    return acc


@triton.jit
def resident_tile(desc, start, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr):
    """A tile of rows (or keys) start + [0, BLOCK) whole, for a program that keeps it for its whole walk
    over the other side: CHUNKS (1 or 2) BLOCK_D-wide pieces through the tensor descriptor, loaded once
    (the compiler keeps loop-invariant dot operands in shared memory); the second piece repeats the first
    when D takes one."""
    first = desc.load([tl.cast(start, tl.int32), 0])
    if CHUNKS == 2:
        second = desc.load([tl.cast(start, tl.int32), BLOCK_D])
    else:
        second = first
    return first, second


@triton.jit
def dot_resident(stream_desc, start, held_first, held_second, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr, HELD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dot_tile (rows × keys, float32) against a tile held by resident_tile: HELD "keys" (the rows at
    start stream through stream_desc) or "rows" (the keys at start stream). Only one side streams, one
    bulk copy a chunk, so the loop over the streamed side is the one the compiler pipelines (it prefetches
    the next tile)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for chunk in tl.static_range(CHUNKS):
        held = held_first if chunk == 0 else held_second
        streamed = stream_desc.load([tl.cast(start, tl.int32), chunk * BLOCK_D])
        if HELD == "keys":
            acc = matmul(streamed, tl.trans(held), acc, DOT_PRECISION)
        else:
            acc = matmul(held, tl.trans(streamed), acc, DOT_PRECISION)
    return acc


@triton.jit
def walk_span(mixed_ptr, begin, stop, TILES: tl.constexpr):
    """(first, count, skip_at, skip): which of [begin, stop) (keys or rows, whole tiles of them) a program
    walks. TILES "all": all of it; "mixed": only the mixed range [lo, hi) at mixed_ptr (label_order.py);
    "negative": the rest, count steps from first that jump the range (walk_at)."""
    first, count, skip_at, skip = begin, stop - begin, stop, stop * 0
    if TILES != "all":
        lo = tl.minimum(tl.maximum(tl.load(mixed_ptr).to(tl.int64), begin), stop)
        hi = tl.minimum(tl.maximum(tl.load(mixed_ptr + 1).to(tl.int64), lo), stop)
        if TILES == "mixed":
            first, count = lo, hi - lo
        else:  # before the mixed range, then after it
            count, skip_at, skip = count - (hi - lo), lo, hi - lo
    return first, count, skip_at, skip


@triton.jit
def walk_at(first, step, skip_at, skip):
    """The start of the tile `step` positions into a walk_span: a jump, not a branch, so that the loop
    stays one the compiler can pipeline."""
    position = first + step
    return tl.where(position >= skip_at, position + skip, position)


@triton.jit
def circle_row_terms(norm_q, inv_norm_q, margin, logit_scale, offset_pos, offset_neg, slope_scale,
                     DETACH_ALPHA: tl.constexpr):
    """The per-row half of the Circle Loss formula: what circle_epilogue needs of row i.
    One place with circle_epilogue: together they are the formula, α, Δ and the margin written once.

    norm_q, inv_norm_q: ‖q_i‖ and 1/‖q_i‖, finite (rows past B pass 1); logit_scale: a scalar;
    offset_pos, offset_neg: what each kind's logit has subtracted (a log-sum-exp in the backward, 0 in
    the forward); slope_scale: what the slope is multiplied by. All (BLOCK_B,) but the scalars.
    Returns (row, weight_unit): row, the seven (BLOCK_B,) terms circle_epilogue takes, and weight_unit,
    the unit of the weight exp2(logit) it gives (1 with α detached; the slope's factor with the true
    derivative, see below), by which a caller scales any constant it subtracts from that weight.

    Both kinds are one formula in r, the similarity seen from the kind's optimum (r = s on negatives,
    r = 1 - s on positives): α = relu(r + m) and the distance to the margin is r - m, since
    α^p = relu(O_p - s) = relu((1 - s) + m), Δ_p - s = (1 - s) - m with O_p = 1 + m, Δ_p = 1 - m, and
    α^n = relu(s - O_n) = relu(s + m), s - Δ_n = s - m with O_n = -m, Δ_n = m. dr/ds = ∓1.
    With u = max(r, -m), α = u + m and the logit α·(r - m) is (u + m)(u - m) = u² - m² (0 where α is
    clipped). The tile is held in units of 1/‖q_i‖, so that s is never formed: y = ‖q_i‖·r and
    v = max(y, threshold) = ‖q_i‖·u with threshold = -m‖q_i‖, so the scaled logit is
    v·(v·curvature) - offset with curvature = logit_scale/‖q_i‖² and the kind's offset holding
    logit_scale·m².
    α detached: the slope (d logit / d s, ∓ for the kind) is ∓α·slope_scale = ∓(v·slope_neg + slope_at_zero)
    with slope_neg = slope_scale/‖q_i‖ and slope_at_zero = m·slope_scale; row = (‖q_i‖, threshold,
    curvature, offset_pos, offset_neg, slope_neg, slope_at_zero).
    True derivative: d(u² - m²)/dr = 2u where α is not clipped, 0 where it is, so the slope is
    ∓v·f with f = 2·slope_scale/‖q_i‖: linear in v, whose sign the logit does not see (v²). So the
    epilogue carries f's sign on v (v = sign(f)·(t - ‖q_i‖) on positives, sign(f)·t on negatives: the
    ∓ of the kind comes with it) and its magnitude in the exponent (log2|f| taken off both offsets): the
    slope is v itself and the weight comes in units of |f| (weight_unit), one multiplication less an
    element. row = (sign(f)·‖q_i‖, threshold, curvature, offset_pos, offset_neg, sign(f),
    positive_bound) with positive_bound = (1 + m)‖q_i‖, where a positive's α is clipped (s ≥ 1 + m:
    only for m < 0, circle_epilogue's CLIP_POSITIVES). f = 0 (a row without loss) makes the offsets
    +inf and its weights 0; f NaN makes them NaN. (exp2 flushes what falls below 2^-126 to 0, here
    weight·|f|: a row's similarities whose gradient is that far below 1 in these units get 0.)
    """
    # float32 scalars, as on a GPU (the interpreter would carry a product like m² below 2^-126 in float64)
    margin, logit_scale = tl.cast(margin, tl.float32), tl.cast(logit_scale, tl.float32)
    constant = logit_scale * margin * margin
    threshold = -margin * norm_q
    curvature = logit_scale * inv_norm_q * inv_norm_q
    if DETACH_ALPHA:
        row = (norm_q, threshold, curvature, offset_pos + constant, offset_neg + constant, inv_norm_q * slope_scale,
               margin * slope_scale)
        weight_unit = tl.full(norm_q.shape, 1.0, tl.float32)
    else:
        slope_factor = 2.0 * inv_norm_q * slope_scale
        sign = tl.where(slope_factor < 0, -1.0, 1.0)
        weight_unit = tl.abs(slope_factor)
        shift = constant - tl.log2(weight_unit)
        row = (sign * norm_q, threshold, curvature, offset_pos + shift, offset_neg + shift, sign, norm_q - threshold)
    return row, weight_unit


@triton.jit
def circle_epilogue(t, is_pos, row, DETACH_ALPHA: tl.constexpr, CLIP_POSITIVES: tl.constexpr):
    """The per-element half of the Circle Loss formula on a tile, with row i's terms from
    circle_row_terms (row: seven (BLOCK_B,) vectors).

    t: q_i · k̂_j, the raw query against the normalised key (s_ij = t_ij / ‖q_i‖), float32;
    is_pos: a tile of b_j == a_i, or a constant True / False for a tile of one kind.
    Returns (logit · logit_scale - offset of the element's kind, slope), where
      logit  u_ij / γ = -α^p·(s - Δ_p) on positives, v_ij / γ = α^n·(s - Δ_n) on negatives; masks
             (bounds, labels, excluded keys) are the caller's;
      slope  α detached: (d logit / d s)·slope_scale/γ = ∓α·slope_scale. True derivative: the slope
             -2(1 - s)·[α^p > 0] and 2s·[α^n > 0] times slope_scale, in the units circle_row_terms
             describes (its magnitude rides in the exponent: weight·slope is the same product).
    A clipped element's v is 0, so that its slope is 0 with no second select; its logit is then
    log2|f| - offset, finite (f = 2·slope_scale/‖q_i‖ finite, the offset at least logit_scale·m²
    plus the kind's log-sum-exp, at least its largest logit, and no logit is below -logit_scale·m²),
    and it only multiplies that 0.
    CLIP_POSITIVES (m < 0; the true derivative): a positive's α can be clipped (s ≥ 1 + m), so it takes
    a compare of its own. With m ≥ 0 it cannot (s ≤ 1 ≤ 1 + m; at m = 0 only s = 1 would, where the
    slope is 0 anyway): negatives alone are compared. Either way the clip is a compare of t (not of y:
    LLVM's SLP vectoriser turns compares of a longer chain into packed predicate vectors, ~7
    instructions an element offline) and a select, not arithmetic on a difference, which compiled
    code contracts into an fma and so does not make exactly 0 where α is clipped.
    """
    if DETACH_ALPHA:
        norm_q, threshold, curvature, offset_pos, offset_neg, slope_neg, slope_at_zero = row
        y = tl.where(is_pos, norm_q[:, None] - t, t)  # ‖q_i‖·r
        v = tl.maximum(y, threshold[:, None], propagate_nan=tl.PropagateNan.ALL)  # NaN in t stays NaN
    else:
        signed_norm, threshold, curvature, offset_pos, offset_neg, sign, positive_bound = row
        if CLIP_POSITIVES:
            clipped = tl.where(is_pos, t >= positive_bound[:, None], t <= threshold[:, None])
        else:
            clipped = tl.where(is_pos, False, t <= threshold[:, None])
        # sign(f)·‖q_i‖·(∓r); NaN in t fails the compares and stays
        v = tl.where(clipped, 0.0, tl.fma(t, sign[:, None], -tl.where(is_pos, signed_norm[:, None], 0.0)))
    # (the offsets negated a row, not an element: triton 3.6 would negate each selected one apart)
    logit = tl.fma(v, v * curvature[:, None], tl.where(is_pos, -offset_pos[:, None], -offset_neg[:, None]))
    if DETACH_ALPHA:  # (after the logit: the other order has ptxas move predicates through registers)
        slope = tl.where(is_pos, tl.fma(v, -slope_neg[:, None], -slope_at_zero[:, None]),
                         tl.fma(v, slope_neg[:, None], slope_at_zero[:, None]))
    else:
        slope = v
    return logit, slope


@triton.jit
def gathered_positive(q_ptr, k_ptr, inv_norm_k_ptr, rows, q_label, B, N, D, stride_qb, stride_qd, stride_kn,
                      stride_kd, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(t_{i,a_i} = q_i · k̂_{a_i}, has_pos) for class-level rows, O(BLOCK_B·D): the one positive of each
    row, its class (t is 0 where a_i is no key: such a row has no positive)."""
    has_pos = (rows < B) & (q_label >= 0) & (q_label < N)
    key = tl.where(has_pos, q_label, 0).to(tl.int64)
    dot = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = has_pos[:, None] & (dims < D)[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qb + dims[None, :] * stride_qd, mask=mask, other=0.0)
        k = tl.load(k_ptr + key[:, None] * stride_kn + dims[None, :] * stride_kd, mask=mask, other=0.0)
        dot += tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)
    return dot * tl.load(inv_norm_k_ptr + key), has_pos


@triton.jit
def query_norms(inv_norm_q_ptr, rows, B):
    """(‖q_i‖, 1/‖q_i‖) as circle_row_terms takes them: 1 for rows past B, so their terms stay finite."""
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=rows < B, other=1.0)
    return 1.0 / inv_norm_q, inv_norm_q


@triton.jit
def row_labels(q_label_ptr, rows, B, CLASS_LEVEL: tl.constexpr):
    """a_i; class-level labels index keys (< N < 2^31) and are compared as int32."""
    q_label = tl.load(q_label_ptr + rows, mask=rows < B, other=-1)
    if CLASS_LEVEL:
        q_label = q_label.to(tl.int32)
    return q_label


@triton.jit
def row_excluded_keys(excluded_key_ptr, rows, B):
    """Each row's excluded key (-1 for rows past B)."""
    return tl.load(excluded_key_ptr + rows, mask=rows < B, other=-1)


@triton.jit
def keys_in_bounds(first_key, N, BLOCK_N: tl.constexpr):
    """The tile's columns j = first_key + [0, BLOCK_N) with j < N, compared as int32 offsets."""
    return tl.arange(0, BLOCK_N) < tl.minimum(N - first_key, BLOCK_N).to(tl.int32)


@triton.jit
def column_labels(k_label_ptr, first_key, N, BLOCK_N: tl.constexpr, CLASS_LEVEL: tl.constexpr):
    """b_j for the tile's keys j = first_key + [0, BLOCK_N), as positive_pairs takes them: pair-wise
    labels (-1 past N), or for class-level keys (b_j = j, the rows of W) the int32 offsets j - first_key."""
    if CLASS_LEVEL:
        labels = tl.arange(0, BLOCK_N)
    else:
        keys = first_key + tl.arange(0, BLOCK_N)
        labels = tl.load(k_label_ptr + keys, mask=keys < N, other=-1)
    return labels


@triton.jit
def positive_pairs(q_label, k_label, first_key, CLASS_LEVEL: tl.constexpr):
    """The tile of b_j == a_i, k_label from column_labels (class-level: compared as int32 offsets from
    first_key)."""
    if CLASS_LEVEL:
        return (q_label - first_key).to(tl.int32)[:, None] == k_label[None, :]
    return q_label[:, None] == k_label[None, :]


@triton.jit
def excluded_pairs(excluded_key, first_key, BLOCK_N: tl.constexpr):
    """The tile of j == excluded_key[i] for keys first_key + [0, BLOCK_N): each row's own slot (i itself
    for in-batch keys, its memory slot in a cross-batch memory; -1 for none), compared as int32 offsets."""
    return (excluded_key - first_key).to(tl.int32)[:, None] == tl.arange(0, BLOCK_N)[None, :]


def dense_labels(query_labels: torch.Tensor, key_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-wise labels as int32 (B,) and (N,) that are equal exactly where the int64 labels are: each
    label's first position among all B + N sorted, so a tile compares them with one 32-bit compare. A
    sort and a search of B + N integers, without a host synchronisation."""
    both = query_labels if key_labels is query_labels else torch.cat([query_labels, key_labels])
    ordered = both.sort().values
    return (torch.searchsorted(ordered, query_labels).to(torch.int32),
            torch.searchsorted(ordered, key_labels).to(torch.int32))


def problem_arguments(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels,
                      inv_norm_q: torch.Tensor, inv_norm_k: torch.Tensor, margin: float, gamma: float,
                      excluded_keys) -> dict:
    """The keyword arguments every circle_* tile kernel takes about the problem: operands (read through
    their strides), labels, inverse norms, m, γ, the label form (key_labels None: class-level
    keys, b_j = j) and each row's excluded key (None: none). Class-level labels (B int64) and excluded
    keys are passed contiguous, as the kernels index them (a column slice or an expanded tensor is
    copied); pair-wise labels as dense_labels."""
    B, D = queries.shape
    if key_labels is None:
        q_labels = k_labels = query_labels.contiguous()
    else:
        q_labels, k_labels = dense_labels(query_labels, key_labels)
    return dict(
        q_ptr=queries, k_ptr=keys, q_label_ptr=q_labels, k_label_ptr=k_labels,
        inv_norm_q_ptr=inv_norm_q, inv_norm_k_ptr=inv_norm_k,
        B=B, N=keys.shape[0], D=D, stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_kn=keys.stride(0), stride_kd=keys.stride(1), margin=margin, gamma=gamma,
        excluded_key_ptr=(excluded_keys if excluded_keys is not None else query_labels).contiguous(),
        CLASS_LEVEL=key_labels is None, EXCLUDE_KEY=excluded_keys is not None,
        DOT_PRECISION=dot_precision(queries.dtype),
    )


def edge_ranges(length: int, block_n: int) -> list[tuple[int, int, bool]]:
    """[(begin, end, EDGE)]: the whole tiles of [0, length), launched without bounds masks (EDGE False),
    then the last partial tile, launched on its own with them (EDGE True); empty ranges left out."""
    full = length // block_n * block_n
    return [(begin, end, edge) for begin, end, edge in ((0, full, False), (full, length, True)) if end > begin]


def _descriptor(x: torch.Tensor, block: list, shape: list = None) -> TensorDescriptor:
    """A tensor descriptor of x (or of its first `shape` rows and columns), in blocks of `block`."""
    return TensorDescriptor(x, list(x.shape) if shape is None else shape, list(x.stride()), block)


def copy_engine_reads(x: torch.Tensor) -> bool:
    """Whether the copy engine (TMA) can read x's rows: some rows, unit stride along D, 16-byte aligned
    base and row stride."""
    return x.shape[0] > 0 and x.stride(1) == 1 and x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0


def workspace_product_loads(h: torch.Tensor, chunk_len: int, operand: torch.Tensor, name: str, block: tuple,
                            config) -> dict:
    """How a product of the workspace's chunk reads its operands (grad_queries: H · K, grad_keys:
    Hᵀ · Q): the keyword arguments h_desc, `name` (the other operand's descriptor) and TMA. Tensor
    descriptors (TMA) where the presets allow them (tma_allowed) and the copy engine reads the operand
    (copy_engine_reads; h always does): H's over its first chunk_len columns (workspace_descriptor) and
    the operand's whole, in blocks of the config's sizes (`block` names the operand's), so that blocks
    past them read as zeros; otherwise pointers."""
    if not (tma_allowed(operand) and copy_engine_reads(operand)):
        return {"h_desc": None, name: None, "TMA": False}
    return {"h_desc": workspace_descriptor(h, config, chunk_len),
            name: _descriptor(operand, [config.blocks[size] for size in block]),
            "TMA": True}


def operand_loads(queries: torch.Tensor, keys: torch.Tensor, config) -> dict:
    """How a tile kernel reads its operands (dot_tile): the keyword arguments q_desc, k_desc, TMA and EVEN_D.

    Tensor descriptors (TMA) where the presets allow them (tma_allowed: sm_90 and the interpreter) and
    both operands meet the copy engine's rules: 16-byte aligned base and row stride, unit stride along D.
    Otherwise pointers, with EVEN_D when BLOCK_D divides D."""
    blocks = config.blocks
    use_tma = tma_allowed(queries) and all(copy_engine_reads(x) for x in (queries, keys))
    if not use_tma:
        return dict(q_desc=None, k_desc=None, TMA=False, EVEN_D=queries.shape[1] % blocks["BLOCK_D"] == 0)
    return dict(q_desc=_descriptor(queries, [blocks["BLOCK_B"], blocks["BLOCK_D"]]),
                k_desc=_descriptor(keys, [blocks["BLOCK_N"], blocks["BLOCK_D"]]),
                TMA=True, EVEN_D=False)


def workspace_descriptor(h: torch.Tensor, config, columns: int = None) -> TensorDescriptor:
    """A tensor descriptor of the workspace H in BLOCK_B × BLOCK_N blocks (TMA): the one grad_similarity
    stores its tiles through (all of it), or one over its first `columns` (a chunk's keys), past which
    blocks read as zeros. The workspace is B × chunk with chunk a multiple of every BLOCK_N, so its rows
    are 16-byte aligned."""
    return _descriptor(h, [config.blocks["BLOCK_B"], config.blocks["BLOCK_N"]],
                       None if columns is None else [h.shape[0], columns])
