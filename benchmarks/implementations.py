"""What is compared: the naive loss (backend="reference", eager), torch.compile of that same call,
the fused backend of the device, and the matmul floor. Each becomes a timing.Step."""
import torch

import circleloss_ext

from .cases import Case, make_inputs
from .timing import Step

IMPLEMENTATIONS = ("naive", "compiled", "fused", "floor")

# B × N float32 matrices the baselines hold at their peak, rounded up from peak growth / (4·B·N)
# measured on the CPU with torch 2.13 (naive 11.5, compiled 1.4 to 3.2): used to skip a baseline that
# cannot fit rather than let the OS kill the run.
BN_MATRICES_AT_PEAK = {"naive": 12, "compiled": 4}

# The floor computes its products over key chunks whose B × chunk score block takes at most this.
FLOOR_CHUNK_BYTES = 1 << 30


def class_level_loss(embeddings, keys, labels, backend):
    """The class-level call being measured: keys are the class matrix W (C, D)."""
    return circleloss_ext.circle_loss(embeddings, keys, labels, backend=backend)


def pair_wise_loss(embeddings, keys, labels, key_labels, backend):
    """The pair-wise call being measured: keys are a labelled reference set (N, D)."""
    return circleloss_ext.pairwise_circle_loss(embeddings, labels, ref_embeddings=keys, ref_labels=key_labels,
                                               backend=backend)


def in_batch_loss(embeddings, labels, backend):
    """The pair-wise call within a batch: every embedding against the others."""
    return circleloss_ext.pairwise_circle_loss(embeddings, labels, backend=backend)


LOSSES = {"class": class_level_loss, "pair": pair_wise_loss, "batch": in_batch_loss}


def _leaves(inputs: dict) -> tuple:
    return tuple(inputs[name] for name in ("embeddings", "keys") if name in inputs)


def estimated_peak_bytes(case: Case, impl: str):
    """Estimated peak memory growth of a baseline (None for the others, which hold no B × N)."""
    matrices = BN_MATRICES_AT_PEAK.get(impl)
    return None if matrices is None else matrices * 4 * case.B * case.N


def _loss_step(loss, inputs: dict, backend: str) -> Step:
    leaves = _leaves(inputs)

    def prepare():
        for leaf in leaves:
            leaf.grad = None

    return Step(prepare=prepare, forward=lambda: loss(**inputs, backend=backend),
                backward=lambda value: value.backward())


def _floor_step(inputs: dict) -> Step:
    """The four B × N × D products a fused forward + backward cannot avoid: forward S = Q·Kᵀ;
    backward S again (a fused kernel keeps no B × N tensor, so it recomputes S), G·K for the
    query gradient and Gᵀ·Q for the key gradient (S stands in for G: values do not change the
    time). Over key chunks, into preallocated outputs."""
    queries = inputs["embeddings"].detach()
    keys = inputs["keys"].detach() if "keys" in inputs else queries
    rows = max(1, min(keys.shape[0], FLOOR_CHUNK_BYTES // (queries.shape[0] * queries.element_size())))
    chunks = keys.split(rows)
    scores = queries.new_empty(queries.shape[0], rows)
    grad_queries, grad_keys = torch.empty_like(queries), torch.empty_like(keys)
    grad_keys_chunks = grad_keys.split(rows)

    def score_block(chunk):  # contiguous (B, chunk rows), also for the shorter last chunk
        return scores.view(-1)[:queries.shape[0] * chunk.shape[0]].view(queries.shape[0], chunk.shape[0])

    def forward():
        for chunk in chunks:
            torch.mm(queries, chunk.T, out=score_block(chunk))

    def backward(_):
        grad_queries.zero_()
        for chunk, grad_chunk in zip(chunks, grad_keys_chunks):
            block = score_block(chunk)
            torch.mm(queries, chunk.T, out=block)
            grad_queries.addmm_(block, chunk)
            torch.mm(block.T, queries, out=grad_chunk)

    return Step(prepare=lambda: None, forward=forward, backward=backward)


def build_step(case: Case, impl: str, inputs: dict, fused_backend: str) -> Step:
    """The step of impl on these inputs. "compiled" compiles afresh (dynamic=False: every case
    gets kernels specialised to its shape, the fastest torch.compile can do)."""
    loss = LOSSES[case.label_form]
    if impl == "naive":
        return _loss_step(loss, inputs, "reference")
    if impl == "compiled":
        torch.compiler.reset()
        return _loss_step(torch.compile(loss, dynamic=False), inputs, "reference")
    if impl == "fused":
        return _loss_step(loss, inputs, fused_backend)
    if impl == "floor":
        return _floor_step(inputs)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")


def fused_error(backend: str, device: str) -> float:
    """Largest difference between backend and the reference, over the loss and both gradients of a
    small fp32 case of each label form, relative to the largest reference value. Raises what the
    backend raises when it cannot run here."""
    worst = 0.0
    for case in (Case("class", 8, 64, 16, "fp32"), Case("pair", 8, 64, 16, "fp32"), Case("batch", 8, 8, 16, "fp32")):
        inputs = make_inputs(case, device)
        leaves = _leaves(inputs)
        results = []
        for name in ("reference", backend):
            for leaf in leaves:
                leaf.grad = None
            loss = LOSSES[case.label_form](**inputs, backend=name)
            loss.backward()
            results.append([loss.detach()] + [leaf.grad for leaf in leaves])
        for expected, got in zip(*results):
            scale = expected.abs().max().clamp_min(1e-12)
            worst = max(worst, ((got - expected).abs().max() / scale).item())
    return worst
