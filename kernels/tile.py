"""The pieces every Circle Loss kernel shares: one similarity tile and its epilogue.

Symbols follow docs/design.md: queries q_i with labels a_i, keys k_j with labels b_j,
s_ij = q̂_i · k̂_j, margin m, scale γ.
"""
import torch
import triton
import triton.language as tl

from .presets import dot_precision


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
def dot_tile(q_ptr, k_ptr, rows, keys, B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """q_i · k_j for a BLOCK_B × BLOCK_N tile of raw (unnormalised) rows, in float32.

    `rows` and `keys` are int64 indices; rows ≥ B and keys ≥ N read as zeros.
    """
    row_in = rows[:, None] * stride_qb
    key_in = keys[:, None] * stride_kn
    row_ok = (rows < B)[:, None]
    key_ok = (keys < N)[:, None]
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        in_d = (dims < D)[None, :]
        q = tl.load(q_ptr + row_in + dims[None, :].to(tl.int64) * stride_qd, mask=row_ok & in_d, other=0.0)
        k = tl.load(k_ptr + key_in + dims[None, :].to(tl.int64) * stride_kd, mask=key_ok & in_d, other=0.0)
        acc = matmul(q, tl.trans(k), acc, DOT_PRECISION)
    return acc


@triton.jit
def circle_epilogue(dots, inv_norm_q, inv_norm_k, q_label, k_label, rows, keys, B, N, margin, gamma,
                    EXCLUDE_SELF: tl.constexpr, DETACH_ALPHA: tl.constexpr):
    """The Circle Loss formula on one tile: the one place α, Δ, γ and the masks are written.

    Returns (logit, slope, is_pos, is_pair):
      logit   u_ij = -γ·α^p_ij·(s_ij - Δ_p) on positives, v_ij = γ·α^n_ij·(s_ij - Δ_n) on negatives,
              -inf where (i, j) is no pair (out of bounds, or i == j when EXCLUDE_SELF);
      slope   d logit / d s_ij: -γ·α^p and γ·α^n with α detached; otherwise -2γ(1 - s)·[α^p > 0] and
              2γ·s·[α^n > 0] (a clipped α makes its logit 0 for every s: α^p clips where s > 1 + m, m < 0);
      is_pos  b_j == a_i;  is_pair  (i, j) takes part in the loss.

    Both label kinds share one α tile, α = α^p or α^n, and one distance to the margin,
    Δ_p - s or s - Δ_n, so that logit = γ·α·distance: one tile of each kept live, not two.
    """
    s = dots * inv_norm_q[:, None] * inv_norm_k[None, :]
    is_pair = (rows < B)[:, None] & (keys < N)[None, :]
    if EXCLUDE_SELF:
        is_pair = is_pair & (rows[:, None] != keys[None, :])
    is_pos = q_label[:, None] == k_label[None, :]
    # α^p = relu(O_p - s) with O_p = 1 + m;  α^n = relu(s - O_n) with O_n = -m
    alpha = tl.maximum(tl.where(is_pos, (1.0 + margin) - s, s + margin), 0.0)
    # -(s - Δ_p) with Δ_p = 1 - m;  s - Δ_n with Δ_n = m
    distance = tl.where(is_pos, (1.0 - margin) - s, s - margin)
    logit = tl.where(is_pair, gamma * alpha * distance, float("-inf"))
    if DETACH_ALPHA:
        slope = tl.where(is_pos, -gamma * alpha, gamma * alpha)
    else:  # d(γ·α·distance)/ds where α is not clipped: 2γ(s - 1) = -2γ(distance + m) on positives,
        # 2γ·s = 2γ(distance + m) on negatives (written without s, which need not stay live)
        slope = tl.where(alpha > 0.0, tl.where(is_pos, -2.0 * gamma, 2.0 * gamma) * (distance + margin), 0.0)
    return logit, slope, is_pos, is_pair


@triton.jit
def grad_similarity(logit, slope, is_pos, is_pair, lse_pos, lse_neg, row_scale):
    """∂L/∂s_ij on one tile: σ_i · softmax weight of the logit within its own log-sum-exp · slope.

    `row_scale` is σ_i = sigmoid(LP_i + LN_i) · g_i (0 for rows without a loss).
    """
    lse = tl.where(is_pos, lse_pos[:, None], lse_neg[:, None])
    return tl.where(is_pair, row_scale[:, None] * tl.exp(logit - lse) * slope, 0.0)


@triton.jit
def load_tile_labels(q_label_ptr, k_label_ptr, rows, keys, B, N, CLASS_LEVEL: tl.constexpr):
    """Row labels a_i and key labels b_j (b_j = j for class-level keys, the rows of W)."""
    q_label = tl.load(q_label_ptr + rows, mask=rows < B, other=-1)
    if CLASS_LEVEL:
        k_label = keys
    else:
        k_label = tl.load(k_label_ptr + keys, mask=keys < N, other=-1)
    return q_label, k_label


def problem_arguments(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor, key_labels,
                      inv_norm_q: torch.Tensor, inv_norm_k: torch.Tensor, margin: float, gamma: float,
                      exclude_self: bool) -> dict:
    """The keyword arguments every circle_* kernel takes about the problem: operands (read through
    their strides), labels, inverse norms, m, γ and the label form (key_labels None: class-level
    keys, b_j = j). Labels (B or N int64) are passed contiguous, as load_tile_labels indexes them:
    a column slice or an expanded label tensor is copied."""
    B, D = queries.shape
    return dict(
        q_ptr=queries, k_ptr=keys, q_label_ptr=query_labels.contiguous(),
        k_label_ptr=(key_labels if key_labels is not None else query_labels).contiguous(),
        inv_norm_q_ptr=inv_norm_q, inv_norm_k_ptr=inv_norm_k,
        B=B, N=keys.shape[0], D=D, stride_qb=queries.stride(0), stride_qd=queries.stride(1),
        stride_kn=keys.stride(0), stride_kd=keys.stride(1), margin=margin, gamma=gamma,
        CLASS_LEVEL=key_labels is None, EXCLUDE_SELF=exclude_self, DOT_PRECISION=dot_precision(queries.dtype),
    )
