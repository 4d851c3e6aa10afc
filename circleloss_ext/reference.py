"""The naive formulation: the similarity matrix materialised, gradients by autograd.

It reads like the paper (Sun et al. 2020, Eq. 4-10) and is the correctness oracle of the fused
backends and the baseline of the benchmark. It holds several B × N matrices.
"""
import torch
import torch.nn.functional as F

EPS = 1e-12  # as F.normalize


def circle_loss_rows(queries, keys, query_labels, key_labels, *, margin, gamma, exclude_self, detach_alpha,
                     smooth_pos=0.0, smooth_neg=0.0, excluded_keys=None):
    """(L, has_loss): per-row Circle Loss (B,) and whether row i has both a positive and a negative.

    key_labels b_j; for class-level keys (rows of W) pass b_j = j. With exclude_self the keys are the
    queries and the pair (i, i) is left out. Math in float32 (float64 for float64 inputs).
    A row without a positive or a negative takes no part: L_i = 0 and its values (NaN included)
    reach no gradient; as a key it still counts for the other rows.
    Label smoothing (class level): L_i - smooth_pos·LP_i - smooth_neg·(the sum of row i's negative logits).
    excluded_keys (B,): for a reference set, the key that is no pair of row i (its own slot; -1: none).
    """
    has_loss = rows_with_positive_and_negative(query_labels, key_labels, exclude_self, excluded_keys)
    queries = queries.masked_fill(~has_loss[:, None], 0)
    lse_pos, lse_neg, negative_sum = circle_lse_of_similarities(
        cosine_similarities(queries, keys), query_labels, key_labels, margin=margin, gamma=gamma,
        exclude_self=exclude_self, detach_alpha=detach_alpha, with_negative_sum=True, excluded_keys=excluded_keys)
    # softplus as log(1 + e^x) exactly: F.softplus returns x itself beyond x = 20, whose gradient 1
    # instead of sigmoid(x) is 2e-9 off, too much for a float64 oracle
    row_loss = torch.logaddexp(lse_pos + lse_neg, torch.zeros_like(lse_pos))
    if smooth_pos or smooth_neg:
        row_loss = row_loss - smooth_pos * lse_pos - smooth_neg * negative_sum
    return torch.where(has_loss, row_loss, 0), has_loss


def rows_with_positive_and_negative(query_labels, key_labels, exclude_self, excluded_keys=None):
    """Whether row i has a positive and a negative, from label counts: O((B + N) log N), no B × N mask."""
    sorted_labels = key_labels.sort().values
    with_label = (torch.searchsorted(sorted_labels, query_labels, right=True)
                  - torch.searchsorted(sorted_labels, query_labels))  # keys labelled a_i (i itself when in batch)
    positives = with_label - int(exclude_self)
    negatives = key_labels.shape[0] - with_label
    if excluded_keys is not None:  # the own slot is a positive or a negative that does not count
        has_slot = excluded_keys >= 0
        slot_is_positive = has_slot & (key_labels[excluded_keys.clamp_min(0)] == query_labels)
        positives = positives - slot_is_positive.long()
        negatives = negatives - (has_slot & ~slot_is_positive).long()
    return (positives > 0) & (negatives > 0)


def _pairs(s, exclude_self, excluded_keys):
    """Which (i, j) are pairs: all but i == j in-batch and each row's excluded key."""
    is_pair = torch.ones_like(s, dtype=torch.bool)
    if exclude_self:
        is_pair.fill_diagonal_(False)
    if excluded_keys is not None:
        rows = torch.nonzero(excluded_keys >= 0).squeeze(1)
        is_pair[rows, excluded_keys[rows]] = False
    return is_pair


def nearest_similarities(queries, keys, query_labels, key_labels, *, exclude_self, excluded_keys=None):
    """(2, B): each row's largest positive and largest negative similarity (-inf where it has none),
    from the materialised S; for top-1 accuracy. No gradient."""
    with torch.no_grad():
        s = cosine_similarities(queries, keys).float()
        same_label = query_labels[:, None] == key_labels[None, :]
        is_pair = _pairs(s, exclude_self, excluded_keys)
        return torch.stack([s.masked_fill(~(is_pair & same_label), float("-inf")).amax(dim=1),
                            s.masked_fill(~(is_pair & ~same_label), float("-inf")).amax(dim=1)])


def circle_lse(queries, keys, query_labels, key_labels, *, margin, gamma, exclude_self, detach_alpha):
    """(LP, LN): the log-sum-exps of each row's positive and negative logits (-inf where there is
    none), by the paper's equations on a materialised S."""
    return circle_lse_of_similarities(cosine_similarities(queries, keys), query_labels, key_labels, margin=margin,
                                      gamma=gamma, exclude_self=exclude_self, detach_alpha=detach_alpha)


def cosine_similarities(queries, keys):
    """S = Q̂ · K̂ᵀ (B × N), in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        return F.normalize(queries.to(dtype), dim=1, eps=EPS) @ F.normalize(keys.to(dtype), dim=1, eps=EPS).T


def circle_lse_of_similarities(s, query_labels, key_labels, *, margin, gamma, exclude_self, detach_alpha,
                               with_negative_sum=False, excluded_keys=None):
    """(LP, LN) from the similarity matrix s (B × N): Eq. 4-6 of the paper; with_negative_sum adds the
    sum of each row's negative logits v (label smoothing needs it)."""
    is_pair = _pairs(s, exclude_self, excluded_keys)
    same_label = query_labels[:, None] == key_labels[None, :]
    positive = is_pair & same_label
    negative = is_pair & ~same_label

    # Eq. 5: optima O_p = 1 + m, O_n = -m; margins Δ_p = 1 - m, Δ_n = m.
    alpha_p = torch.relu(1 + margin - s)
    alpha_n = torch.relu(s + margin)
    if detach_alpha:
        alpha_p, alpha_n = alpha_p.detach(), alpha_n.detach()
    delta_p, delta_n = 1 - margin, margin
    u = -gamma * alpha_p * (s - delta_p)
    v = gamma * alpha_n * (s - delta_n)

    lse_pos = torch.logsumexp(u.masked_fill(~positive, float("-inf")), dim=1)
    lse_neg = torch.logsumexp(v.masked_fill(~negative, float("-inf")), dim=1)
    if with_negative_sum:
        return lse_pos, lse_neg, v.masked_fill(~negative, 0).sum(dim=1)
    return lse_pos, lse_neg
