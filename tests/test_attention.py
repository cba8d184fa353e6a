import pytest
import torch

import inhouse.model.attention as attn_mod
from inhouse.model.attention import allowed_mask, attention, attention_reference


def _inputs(T, S, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(Hkv, S, D, generator=g).to(dtype)
    sinks = torch.randn(Hq, generator=g)
    return q, k, v, sinks


def test_mask_is_causal_and_windowed():
    m = allowed_mask(torch.arange(3, 6), torch.arange(0, 6), window=2)
    assert m.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_reference_matches_a_hand_computed_sink_softmax():
    q, k, v, sinks = _inputs(1, 2, 1, 1, 4)
    out = attention_reference(q, k, v, sinks, 1, 0, None, 0.5)
    s = (k[0] @ q[0, 0]) * 0.5  # two key logits
    w = torch.exp(s) / (torch.exp(s).sum() + torch.exp(sinks[0]))
    assert torch.allclose(out[0], w @ v[0], atol=1e-6)


@pytest.mark.parametrize("T, S, q_start, window", [
    (17, 17, 0, None), (17, 17, 0, 5), (1, 40, 39, None), (1, 6, 45, 6),  # decode, sliding cache
    (9, 30, 21, None), (9, 14, 41, 5), (33, 33, 0, 128),
])
@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (4, 1), (3, 3)])
def test_fast_path_matches_reference(T, S, q_start, window, Hq, Hkv):
    q, k, v, sinks = _inputs(T, S, Hq, Hkv, 16)
    k_start = q_start + T - S
    ref = attention_reference(q, k, v, sinks, q_start, k_start, window, 0.25)
    fast = attention(q, k, v, sinks, q_start, k_start, window, 0.25)
    assert torch.allclose(fast, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_chunked_fast_path_matches_reference(monkeypatch, window):
    monkeypatch.setattr(attn_mod, "_MAX_CHUNK_ELEMENTS", 64)  # force many query chunks
    q, k, v, sinks = _inputs(40, 40, 4, 2, 8)
    ref = attention_reference(q, k, v, sinks, 0, 0, window, 0.3)
    assert torch.allclose(attention(q, k, v, sinks, 0, 0, window, 0.3), ref, atol=2e-6)


@pytest.mark.parametrize("T, S, q_start, window", [
    (1, 1, 0, None), (17, 17, 0, None), (40, 40, 0, 8), (9, 30, 21, None), (9, 14, 41, 5)])
@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (3, 3)])
def test_the_training_path_matches_the_reference_and_its_gradients(T, S, q_start, window, Hq,
                                                                    Hkv):
    """With gradients, attention takes the sink-as-a-key path: the same values and the same
    gradients (of q, k, v and the sinks) as the reference's autograd."""
    got = []
    for fn in (attention_reference, attention):
        q, k, v, sinks = (t.clone().requires_grad_() for t in _inputs(T, S, Hq, Hkv, 16))
        out = fn(q, k, v, sinks, q_start, q_start + T - S, window, 0.25)
        (out * torch.sin(out)).sum().backward()  # a loss whose gradient varies by element
        got.append([out.detach()] + [t.grad for t in (q, k, v, sinks)])
    for ref, fast in zip(*got):
        assert torch.allclose(fast, ref, atol=2e-5, rtol=1e-4), (ref - fast).abs().max()


def test_bf16_fast_path_is_close():
    q, k, v, sinks = _inputs(20, 20, 4, 2, 16, dtype=torch.bfloat16)
    ref = attention_reference(q, k, v, sinks, 0, 0, 8, 0.25).float()
    fast = attention(q, k, v, sinks, 0, 0, 8, 0.25).float()
    assert (fast - ref).abs().max() < 3e-2


def test_a_large_sink_absorbs_the_attention():
    q, k, v, sinks = _inputs(5, 5, 2, 1, 8)
    out = attention(q, k, v, torch.full((2,), 50.0), 0, 0, None, 0.3)
    assert out.abs().max() < 1e-6


from inhouse.kernels.cpu import attend_kernel, rows_kernel  # noqa: E402
from inhouse.kernels.cpu.seams import attention as cpu_attention  # noqa: E402

needs_kernel = pytest.mark.skipif(not attend_kernel.available(), reason="kernel not built")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S, q_start, window", [(40, 39, None), (6, 45, 6), (129, 300, 128),
                                                 (300, 299, None), (1, 0, None), (3, 2, 1)])
@pytest.mark.parametrize("Hq, Hkv, D", [(8, 2, 16), (64, 8, 64), (4, 4, 32)])
def test_decode_kernel_matches_the_reference(dtype, S, q_start, window, Hq, Hkv, D):
    q, k, v, sinks = _inputs(1, S, Hq, Hkv, D, dtype=dtype, seed=S)
    k_start = q_start + 1 - S
    assert attend_kernel.applies(q, k)
    ref = attention_reference(q, k, v, sinks, q_start, k_start, window, D ** -0.5)
    got = cpu_attention(q, k, v, sinks, q_start, k_start, window, D ** -0.5)
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32:
        assert torch.allclose(got, ref, atol=2e-6, rtol=1e-5)
    else:  # computed in fp32, rounded once: at most one bf16 step from the reference
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() / 128 + 1e-6).all()


@needs_kernel
def test_decode_kernel_reads_the_cache_buffer_and_ignores_the_threads():
    # keys/values as the full-attention cache hands them: a prefix of a larger buffer per head
    q, k, v, sinks = _inputs(1, 64, 8, 2, 32, dtype=torch.bfloat16, seed=3)
    k_view, v_view = k[:, :50], v[:, :50]
    assert not k_view.is_contiguous()
    got = cpu_attention(q, k_view, v_view, sinks, 49, 0, None, 0.2)
    want = cpu_attention(q, k_view.contiguous(), v_view.contiguous(), sinks, 49, 0, None, 0.2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_attention(q, k_view, v_view, sinks, 49, 0, None, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, want) and torch.equal(got, single)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S, lo", [(15, 0), (16, 0), (17, 0), (48, 0), (200, 0), (300, 171)])
@pytest.mark.parametrize("Hq, Hkv, D", [(64, 8, 64), (6, 1, 16), (10, 2, 80), (4, 2, 256)])
def test_decode_kernel_vector_tiles_give_the_plain_loops_bits(monkeypatch, dtype, S, lo, Hq, Hkv,
                                                               D):
    """On AVX-512 the kernel scores 16 keys at a time and sums values in registers: the plain
    loops' operations in their order, so the same bits (INHOUSE_ATTEND_KERNEL=portable keeps to
    the loops). Key counts around a tile, head dims over 64, groups not a multiple of 4."""
    q, k, v, sinks = _inputs(1, S, Hq, Hkv, D, dtype=dtype, seed=S + D)
    got = attend_kernel.attend_one(q, k, v, sinks, lo, S, D ** -0.5)
    monkeypatch.setenv("INHOUSE_ATTEND_KERNEL", "portable")
    plain = attend_kernel.attend_one(q, k, v, sinks, lo, S, D ** -0.5)
    assert torch.equal(got, plain)
    ref = attention_reference(q, k[:, lo:], v[:, lo:], sinks, S - 1, lo, None, D ** -0.5)
    assert torch.allclose(got.float(), ref.float(), atol=1e-2, rtol=1e-2)


@needs_kernel
def test_decode_kernel_with_no_allowed_key_returns_zeros():
    q, k, v, sinks = _inputs(1, 4, 2, 1, 16)
    out = cpu_attention(q, k, v, sinks, 10, 0, 2, 0.25)  # every key is outside the window
    assert torch.equal(out, torch.zeros(1, 32))
    assert torch.equal(out, attention_reference(q, k, v, sinks, 10, 0, 2, 0.25))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rotary_is_the_pytorch_one_bit_for_bit(dtype):
    from inhouse.model.layers import apply_rotary, apply_rotary_reference

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 5, 64, generator=g) * 4).to(dtype)
    cos, sin = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary_reference(x, cos, sin))


@pytest.mark.skipif(not rows_kernel.available(), reason="kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rmsnorm_matches_the_reference_and_the_batch(dtype):
    from inhouse.model.layers import RMSNorm, rmsnorm_reference

    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(200)
    norm.weight.data = torch.randn(200, generator=g)
    x = (torch.randn(9, 200, generator=g) * 5).to(dtype)
    x[3] = 0  # a zero row: eps keeps it finite
    with torch.no_grad():
        got = norm(x)
        alone = torch.cat([norm(x[i:i + 1]) for i in range(9)])
        assert norm.rows_independent(9)
    want = rmsnorm_reference(x, norm.weight, norm.eps)
    assert got.dtype == dtype and torch.equal(got, alone)
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=2e-6, atol=1e-6)
    else:  # fp32 inside, one rounding: at most one bf16 step apart
        assert ((got.float() - want.float()).abs() <= want.float().abs() / 128 + 1e-6).all()
