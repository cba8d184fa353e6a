"""A self-check of the cuda backend's kernels on the device they are to serve on, run once before
"auto" chooses them: a GPU stack whose Triton cannot compile or run them (an old triton, an
unsupported GPU) then serves on the PyTorch paths instead of failing every request. Tiny shapes,
fp32, against plain PyTorch written here (kernels/ may not import the model's references)."""

from __future__ import annotations

import torch

FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def self_check(device: torch.device) -> str | None:
    """None when every kernel gives its reference's values on `device`; else what differed."""
    from inhouse.kernels.cuda import attention, norm

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w = randn(3, 64), randn(64)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    if not torch.allclose(norm.rmsnorm(x, w, 1e-5), want, atol=1e-4):
        return "rmsnorm differs from its reference"
    q, k, v, sinks = randn(5, 4, 16), randn(2, 9, 16), randn(2, 9, 16), randn(4)
    want = _attention(q, k, v, sinks, 4)
    if not torch.allclose(attention.attention(q, k, v, sinks, 4, 0, None, 0.25), want, atol=1e-4):
        return "attention differs from its reference"
    pages_k = torch.zeros(1, 2, attention.PAGE, 16, device=device)
    pages_v = torch.zeros_like(pages_k)
    pages_k[0, :, :9], pages_v[0, :, :9] = k, v
    i32 = dict(dtype=torch.int32, device=device)
    paged = attention.paged_attention(q, pages_k, pages_v, sinks, torch.zeros(1, 1, **i32),
                                      torch.tensor([0], **i32), torch.tensor([5], **i32),
                                      torch.tensor([4], **i32), torch.tensor([9], **i32),
                                      None, 0.25, max_q=5)
    if not torch.allclose(paged.reshape(5, -1), want, atol=1e-4):
        return "paged attention differs from its reference"
    return _check_sampling(device, g) or _check_moe(device, g)


def _check_sampling(device, g) -> str | None:
    """The sampler's draws against its reference, which carries its own Philox: a Triton whose
    tl.randint drew other numbers would make records that replay nowhere else."""
    from inhouse.kernels.cuda import sampling

    x = torch.randn(4, 300, generator=g) * 2
    keys = [sampling.draw_key(3, i) for i in range(4)]
    args = [torch.tensor(v, device=device) for v in
            ([1.0, 0.7, 1.0, 0.0], [0, 20, 0, 0], [1.0, 1.0, 0.8, 1.0], [0.0, 0.0, 0.05, 0.0])]
    args[1] = args[1].to(torch.int32)
    got = sampling.sample(x.to(device), *args, torch.tensor(keys, device=device)).tolist()
    want = [sampling.sample_reference(x[i], float(args[0][i]), int(args[1][i]), float(args[2][i]),
                                      float(args[3][i]), keys[i]) for i in range(4)]
    return None if got == want else "the sampler's draws differ from its reference"


def _attention(q, k, v, sinks, q_start):
    """Causal GQA attention with sinks, keys from position 0, scale 1/4: (T, Hq*D)."""
    T, Hq, D = q.shape
    G = Hq // k.shape[0]
    kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)  # (Hq, S, D)
    scores = torch.einsum("thd,hsd->hts", q, kk) * 0.25
    future = torch.arange(k.shape[1], device=q.device)[None] > (
        q_start + torch.arange(T, device=q.device))[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    logits = torch.cat([scores, sinks[:, None, None].expand(Hq, T, 1)], -1)
    probs = torch.softmax(logits, -1)[..., :-1]
    return torch.einsum("hts,hsd->thd", probs, vv).reshape(T, Hq * D)


def _check_moe(device, g) -> str | None:
    from inhouse.kernels.cuda import mxfp4_moe

    E, H, I = 2, 64, 32
    packed = [(torch.randint(0, 256, (E, out, inp // 32, 16), generator=g, dtype=torch.uint8),
               torch.randint(120, 130, (E, out, inp // 32), generator=g, dtype=torch.uint8),
               torch.randn(E, out, generator=g)) for out, inp in ((2 * I, H), (H, I))]
    x = torch.randn(3, H, generator=g)
    indices, weights = torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.full((3, 2), 0.5)
    (b1, s1, c1), (b2, s2, c2) = packed
    W1, W2 = _dequantize(b1, s1), _dequantize(b2, s2)
    want = torch.zeros(3, H)
    for n in range(3):
        for j in range(2):
            e = indices[n, j]
            h = x[n] @ W1[e].T + c1[e]
            gate, up = h[::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
            want[n] += weights[n, j] * (((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ W2[e].T
                                        + c2[e])
    on = [tuple(t.to(device) for t in p) for p in packed]
    got = mxfp4_moe.moe(x.to(device), weights.to(device), indices.to(device), on[0], on[1],
                        1.702, 7.0)
    if not torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-3 * float(want.abs().max())):
        return "the MXFP4 experts differ from their reference"
    return None


def _dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, in/32, 16] bytes, [..., out, in/32] E8M0 -> fp32 [..., out, in]."""
    table = torch.tensor(FP4)
    pairs = torch.stack([table[(blocks & 15).long()], table[(blocks >> 4).long()]], -1)
    values = pairs.flatten(-2) * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2)
