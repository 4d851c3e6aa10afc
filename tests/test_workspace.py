"""The Triton backward's bounded workspace (chunks of keys), its fp16 scaling and fp32 precision settings."""
import pytest
import torch

import circleloss_ext as cl
from helpers import check_against_reference, make_inputs, run


@pytest.fixture
def small_workspace():
    before = cl.workspace_limit()
    yield
    cl.set_workspace_limit(before)


@pytest.mark.parametrize("form", ["class", "batch", "reference set"])
def test_backward_in_several_chunks(form, small_workspace):
    """A cap far below B × N: backward walks the keys in chunks (with an odd last one) and gives the
    same loss and gradients as one chunk would."""
    emb, keys, labels, key_labels = make_inputs(37, 203, 24, num_labels=None if form == "class" else 6)
    cl.set_workspace_limit(37 * 64 * 4)  # 64 keys of H per chunk: 4 chunks, the last of 11 keys
    if form == "class":
        check_against_reference(cl.circle_loss, (emb, keys, labels), "triton", detach_alpha=False)
    elif form == "batch":
        check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton")
    else:
        def against(e, y, r, ry, **kw):
            return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, **kw)
        check_against_reference(against, (emb, labels, keys, key_labels), "triton")


@pytest.mark.parametrize("D", [24, 40])  # grad_keys finishes ∂L/∂K itself; its float32 product finished apart
@pytest.mark.parametrize("N", [70, 130])  # two and one row splits of grad_similarity under the interpreter
def test_key_gradients_are_the_same_bits_at_any_cap(N, D, small_workspace):
    """Chunks start on tile boundaries and each key's gradient is reduced over all rows by one program of
    grad_keys, whatever the chunk: the key gradients of one chunk and of chunks of one tile are the same
    bits (under the interpreter's grad_keys preset, D = 24 is finished in the kernel, D = 40 from the
    float32 product it keeps)."""
    emb, keys, labels, _ = make_inputs(37, N, D)
    whole = run(cl.circle_loss, (emb, keys, labels), backend="triton")
    cl.set_workspace_limit(37 * 32 * 4)  # 32 keys of H per chunk, the last one partial
    chunked = run(cl.circle_loss, (emb, keys, labels), backend="triton")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1][1], chunked[1][1])
    torch.testing.assert_close(chunked[1][0], whole[1][0], rtol=1e-5, atol=1e-6)


def test_chunk_size_follows_the_cap():
    from circleloss_ext.kernels.backward import chunk_keys
    gib = 1 << 30
    assert chunk_keys(1024, 1_000_000, 512, torch.bfloat16, 128, False) == gib // (1024 * 2) // 128 * 128
    # where grad_keys keeps its float32 product (D wider than its accumulators), that counts too, with
    # the float32 keys it is finished with
    assert chunk_keys(1024, 1_000_000, 1024, torch.bfloat16, 128, True) == gib // (1024 * 2 + 1024 * 8) // 128 * 128
    assert chunk_keys(4, 100, 8, torch.float32, 32, False) == 128  # never more than N needs
    assert chunk_keys(10**6, 10**6, 8, torch.float32, 256, False) == 256  # at least one aligned step


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_workspace_limit_is_checked(bad, small_workspace):
    with pytest.raises(ValueError, match="workspace limit must be a positive number of bytes"):
        cl.set_workspace_limit(bad)


@pytest.mark.parametrize("scales", [(1e-3, 1e-3), (100.0, 100.0)], ids=["short-rows", "long-rows"])
def test_fp16_workspace_stays_in_range(scales):
    """fp16 has 5 exponent bits: short rows make H = G·(1/‖q‖)·(1/‖k‖) overflow and long rows flush it to
    zero unless it is scaled by a power of two (kernels/backward.py)."""
    emb, keys, labels, _ = make_inputs(33, 70, 40)
    emb, keys = (emb * scales[0]).half(), (keys * scales[1]).half()
    check_against_reference(cl.circle_loss, (emb, keys, labels), "triton", dtype=torch.float16, gamma=256.0,
                            reduction="sum")


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_follows_the_matmul_precision(precision):
    from circleloss_ext.kernels.presets import dot_precision
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert dot_precision(torch.float32) == {"highest": "tf32x3", "high": "tf32x3", "medium": "tf32"}[precision]
        emb, keys, labels, _ = make_inputs(19, 45, 20)
        check_against_reference(cl.circle_loss, (emb, keys, labels), "triton")  # the interpreter multiplies in fp32
    finally:
        torch.set_float32_matmul_precision(before)
