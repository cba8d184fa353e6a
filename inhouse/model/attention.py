"""Causal GQA attention with learned sinks and an optional sliding window.

Positions are absolute: the T queries sit at q_start..q_start+T-1, the S keys at
k_start..k_start+S-1 (keys are contiguous in position and end with the queries' own keys). A query
at q sees keys k with k <= q and, on sliding layers, k > q - window.

Sinks (https://arxiv.org/abs/2309.17453, as in gpt-oss): each head has a learned logit appended as
an extra column before the softmax and dropped after: it absorbs probability and carries no value.

`attention_reference` is the obvious einsum version (fp32, full score matrix). `attention` is the
fast path: a single query row (decode) goes to our C kernel (attend_kernel: one call, sinks and the
allowed key range included); more rows to torch's fused CPU flash kernel over query chunks, which
also returns the log-sum-exp L of each row; the sink then enters exactly as out * sigmoid(L - sink),
since softmax-with-sink = softmax * Z / (Z + e^sink) and Z = e^L.

Gradients (training) cannot take that path: the flash op's log-sum-exp has no derivative. They
take `_sink_as_key`: the sink as one more key that every query sees, with score = the sink and
value zero (q gains a constant 1 and that key the sink over the scale in one more dimension),
through torch's differentiable scaled_dot_product_attention. Exact, about half the reference's
time on short sequences and a third on long ones.
"""

from __future__ import annotations

import torch


_NEG_INF = float("-inf")
# Elements of (queries x keys x heads-per-group) in one chunk of the fast path's score tile.
_MAX_CHUNK_ELEMENTS = 1 << 25


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T,) x (S,) -> bool (T, S): causal, and within the window on sliding layers."""
    diff = q_pos[:, None] - k_pos[None, :]  # (T, S): how far back each key is
    ok = diff >= 0
    if window is not None:
        ok &= diff < window
    return ok


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                        q_start: int, k_start: int, window: int | None,
                        scale: float) -> torch.Tensor:
    """q (T, Hq, D), k/v (Hkv, S, D), sinks (Hq,) -> (T, Hq*D) in q's dtype; computed in fp32."""
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv  # query heads per kv head: query head h uses kv head h // G
    qg = q.float().view(T, Hkv, G, D)
    scores = torch.einsum("tkgd,ksd->kgts", qg, k.float()) * scale  # (Hkv, G, T, S)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    k_pos = torch.arange(k_start, k_start + S, device=q.device)
    scores = scores.masked_fill(~allowed_mask(q_pos, k_pos, window), _NEG_INF)
    sink = sinks.float().view(Hkv, G, 1, 1).expand(Hkv, G, T, 1)
    logits = torch.cat([scores, sink], dim=-1)  # (Hkv, G, T, S+1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column
    out = torch.einsum("kgts,ksd->tkgd", probs, v.float())  # (T, Hkv, G, D)
    return out.reshape(T, Hq * D).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_start: int, k_start: int, window: int | None, scale: float) -> torch.Tensor:
    """Same contract as `attention_reference`; memory O(chunk x keys), not O(T x S)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad or sinks.requires_grad)
    if needs_grad:
        return _chunked(_sink_as_key, q, k, v, sinks, q_start, k_start, window, scale)
    if q.device.type != "cpu" or not _has_cpu_flash():
        return _chunked(attention_reference, q, k, v, sinks, q_start, k_start, window, scale)
    return _chunked(_flash_with_sinks, q, k, v, sinks, q_start, k_start, window, scale)


def _chunked(fn, q, k, v, sinks, q_start, k_start, window, scale) -> torch.Tensor:
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    span = S if window is None else min(S, window + T)
    chunk = max(1, min(T, _MAX_CHUNK_ELEMENTS // (G * max(span, 1))))
    if chunk >= T:
        return fn(q, k, v, sinks, q_start, k_start, window, scale)
    outs = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        # keys this chunk can see: positions [lo, q_start + b)
        lo = k_start if window is None else max(k_start, q_start + a - window + 1)
        hi = q_start + b
        ks, vs = k[:, lo - k_start:hi - k_start], v[:, lo - k_start:hi - k_start]
        outs.append(fn(q[a:b], ks, vs, sinks, q_start + a, lo, window, scale))
    return torch.cat(outs, dim=0)


def _flash_with_sinks(q, k, v, sinks, q_start, k_start, window, scale) -> torch.Tensor:
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    # Fold the G query heads of a kv head into the query axis: (1, Hkv, G*T, D), rows ordered (g, t).
    qh = q.view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * T, D)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    k_pos = torch.arange(k_start, k_start + S, device=q.device)
    ok = allowed_mask(q_pos, k_pos, window)  # (T, S)
    mask = None
    if not bool(ok.all()):
        mask = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(~ok, _NEG_INF)
        mask = mask.repeat(G, 1)  # (G*T, S), matching qh's row order
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, attn_mask=mask, scale=scale)
    # out (1, Hkv, G*T, D), lse (1, Hkv, G*T) fp32
    keep = torch.sigmoid(lse.view(Hkv, G, T) - sinks.float().view(Hkv, G, 1))  # share not sunk
    out = out.view(Hkv, G, T, D) * keep.unsqueeze(-1).to(out.dtype)
    return out.permute(2, 0, 1, 3).reshape(T, Hq * D)


def _sink_as_key(q, k, v, sinks, q_start, k_start, window, scale) -> torch.Tensor:
    """Differentiable, in fp32 like the reference: the sink is key 0 of every head, seen by all
    queries, with score q'.k0 * scale = sinks[h] (q' = [q, 1], k0 = [0, sinks[h] / scale]) and a
    zero value."""
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    qh = torch.cat([q.float(), q.new_ones(T, Hq, 1, dtype=torch.float32)], -1).transpose(0, 1)
    kh = torch.cat([k.float(), k.new_zeros(Hkv, S, 1, dtype=torch.float32)], -1)
    sink_key = torch.cat([sinks.new_zeros(Hq, 1, D, dtype=torch.float32),
                          (sinks.float() / scale).view(Hq, 1, 1)], -1)
    kh = torch.cat([sink_key, kh.repeat_interleave(G, 0)], 1)  # (Hq, 1+S, D+1)
    vh = torch.cat([v.new_zeros(Hq, 1, D, dtype=torch.float32),
                    v.float().repeat_interleave(G, 0)], 1)  # (Hq, 1+S, D)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    k_pos = torch.arange(k_start, k_start + S, device=q.device)
    ok = torch.cat([torch.ones(T, 1, dtype=torch.bool, device=q.device),
                    allowed_mask(q_pos, k_pos, window)], 1)
    mask = torch.zeros(T, S + 1, device=q.device).masked_fill_(~ok, _NEG_INF)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                                           scale=scale)  # (Hq, T, D)
    return out.transpose(0, 1).reshape(T, Hq * D).to(q.dtype)


_FLASH: list[bool] = []


def _has_cpu_flash() -> bool:
    if not _FLASH:
        _FLASH.append(hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))
    return _FLASH[0]
