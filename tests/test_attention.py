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


def test_bf16_fast_path_is_close():
    q, k, v, sinks = _inputs(20, 20, 4, 2, 16, dtype=torch.bfloat16)
    ref = attention_reference(q, k, v, sinks, 0, 0, 8, 0.25).float()
    fast = attention(q, k, v, sinks, 0, 0, 8, 0.25).float()
    assert (fast - ref).abs().max() < 3e-2


def test_a_large_sink_absorbs_the_attention():
    q, k, v, sinks = _inputs(5, 5, 2, 1, 8)
    out = attention(q, k, v, torch.full((2,), 50.0), 0, 0, None, 0.3)
    assert out.abs().max() < 1e-6
