"""Causal GQA attention with sinks and the sliding window, for decode and prefill, in one Triton
kernel over contiguous or paged keys.

A program takes BLOCK_M rows of one sequence and one kv head: the G query heads of that kv head
folded into the rows (row r = query t = r // G of head g = r % G; at decode one tile holds all
G heads, so each key block is read once for the group). Keys go by in blocks of PAGE positions
aligned to absolute position 0, with an online softmax that starts from the sink: running max =
sink, running sum = 1 (the sink's e^0), value 0, which is the softmax with the sink as an extra
column (https://arxiv.org/abs/2309.17453). A row's blocks are the same whatever else shares its
tile (blocks wholly outside its range change nothing: they add e^-inf = 0 and rescale by e^0 = 1),
so a query row gets the same bits at decode and in a prefill chunk, alone or batched.

Keys are addressed per sequence either contiguously (`attention`: the model's KVCache, (Hkv, S, D)
from position k_start) or through a block table over a pool of pages (`paged_attention`:
(num_pages, Hkv, PAGE, D), page j of a sequence holding its positions j*PAGE..j*PAGE+PAGE-1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inhouse.kernels.cuda import dot_in_fp32

from inhouse.kernels.backend import PAGE_SIZE as PAGE  # key positions per block (and per page)

BLOCK_M = 16  # rows (query, head) per program: tl.dot's smallest M


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, sinks_ptr, o_ptr,
                      q_row0_ptr, num_q_ptr, q_pos0_ptr, num_k_ptr,
                      one_num_q, one_q_pos0, one_k_pos0, one_num_k,
                      table_ptr, table_stride,
                      stride_qt, stride_qh, stride_kp, stride_kh, stride_kt,
                      stride_vp, stride_vh, stride_vt, stride_ot, stride_oh,
                      scale, window,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      PAGE: tl.constexpr, PAGED: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    if PAGED:  # per sequence, from the device; keys from position 0
        num_q = tl.load(num_q_ptr + seq)
        q_row0 = tl.load(q_row0_ptr + seq).to(tl.int64)
        q_pos0 = tl.load(q_pos0_ptr + seq)
        k_pos0 = 0
        k_end = tl.load(num_k_ptr + seq)
    else:  # one sequence, its numbers as arguments (nothing copied to the device per call)
        num_q = one_num_q
        q_row0 = 0
        q_pos0 = one_q_pos0
        k_pos0 = one_k_pos0
        k_end = one_k_pos0 + one_num_k
    if tile * BLOCK_M >= num_q * G:
        return
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t, g = r // G, r % G
    row_ok = t < num_q
    head = kv_head * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q_row0 + t)[:, None] * stride_qt + head[:, None] * stride_qh
                + d[None, :], mask=row_ok[:, None], other=0.0)  # (BM, D)
    q_pos = q_pos0 + t
    m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)  # the sink's logit
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    # positions this tile may see: [lo, hi), walked in PAGE blocks aligned to position 0
    last_t = tl.minimum(num_q - 1, (tile * BLOCK_M + BLOCK_M - 1) // G)
    hi = tl.minimum(q_pos0 + last_t + 1, k_end)
    lo = k_pos0
    if window > 0:
        lo = tl.maximum(lo, q_pos0 + (tile * BLOCK_M) // G - window + 1)
    for p0 in range((lo // PAGE) * PAGE, hi, PAGE):
        p = p0 + tl.arange(0, PAGE)
        in_range = (p >= k_pos0) & (p < k_end)
        if PAGED:
            page = tl.load(table_ptr + seq.to(tl.int64) * table_stride + p0 // PAGE).to(tl.int64)
            k_off = page * stride_kp + (p - p0).to(tl.int64) * stride_kt
            v_off = page * stride_vp + (p - p0).to(tl.int64) * stride_vt
        else:
            k_off = (p - k_pos0).to(tl.int64) * stride_kt
            v_off = (p - k_pos0).to(tl.int64) * stride_vt
        keys = tl.load(k_ptr + kv_head * stride_kh + k_off[:, None] + d[None, :],
                       mask=in_range[:, None], other=0.0)  # (PAGE, D)
        values = tl.load(v_ptr + kv_head * stride_vh + v_off[:, None] + d[None, :],
                         mask=in_range[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(keys))
        scores = scores * scale  # (BM, PAGE) fp32
        seen = in_range[None, :] & (p[None, :] <= q_pos[:, None])
        if window > 0:
            seen = seen & (p[None, :] > q_pos[:, None] - window)
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        rescale = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l_i = l_i * rescale + tl.sum(probs, axis=1)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(probs, values.to(tl.float32),
                                                  input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (q_row0 + t)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _launch(q, k, v, sinks, per_seq, one, table, window: int | None, scale: float,
            k_strides, v_strides, num_seqs: int, max_q: int) -> torch.Tensor:
    """per_seq: (q_row0, num_q, q_start, num_k) device tensors (paged), or None and `one`:
    (num_q, q_start, k_start, num_k) ints (contiguous)."""
    rows, Hq, D = q.shape
    Hkv = k.shape[-3]
    G = Hq // Hkv
    paged = per_seq is not None
    per_seq = per_seq if paged else (q, q, q, q)  # unread placeholders
    one = one or (0, 0, 0, 0)
    out = torch.empty_like(q)
    grid = (num_seqs, Hkv, triton.cdiv(max(max_q, 1) * G, BLOCK_M))
    _attention_kernel[grid](
        q, k, v, sinks, out, *per_seq, *one,
        table, table.stride(0) if paged else 0,
        q.stride(0), q.stride(1), *k_strides, *v_strides, out.stride(0), out.stride(1),
        float(scale), int(window or 0),
        G=G, D=D, BLOCK_M=BLOCK_M, PAGE=PAGE, PAGED=paged, IEEE=dot_in_fp32(q.dtype))
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_start: int, k_start: int, window: int | None, scale: float) -> torch.Tensor:
    """model.attention's contract: q (T, Hq, D), k/v (Hkv, S, D) (any strides with D
    contiguous: a KVCache's slices) -> (T, Hq*D) in q's dtype."""
    T, Hq, D = q.shape
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out = _launch(q, k, v, sinks, None, (T, q_start, k_start, k.shape[1]), q, window, scale,
                  (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1)), 1, T)
    return out.reshape(T, Hq * D)


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    sinks: torch.Tensor, block_table: torch.Tensor, q_row0: torch.Tensor,
                    num_q: torch.Tensor, q_start: torch.Tensor, num_k: torch.Tensor,
                    window: int | None, scale: float, max_q: int | None = None) -> torch.Tensor:
    """Several sequences at once. q (rows, Hq, D): sequence i's num_q[i] queries at rows
    q_row0[i].., positions q_start[i]..; its keys are positions 0..num_k[i]-1 (the new ones
    included), position p in page block_table[i, p // PAGE] of k_pages/v_pages
    (num_pages, Hkv, PAGE, D) at slot p % PAGE. Pages wholly before a sliding window may be
    unset (never read). `max_q`: the most queries of a sequence (1 at decode; None: asked of
    num_q, which waits for the device). -> (rows, Hq, D)."""
    per_seq = tuple(t.contiguous() for t in (q_row0, num_q, q_start, num_k))  # read as rows
    return _launch(q.contiguous(), k_pages, v_pages, sinks, per_seq, None,
                   block_table, window, scale,
                   (k_pages.stride(0), k_pages.stride(1), k_pages.stride(2)),
                   (v_pages.stride(0), v_pages.stride(1), v_pages.stride(2)), num_q.shape[0],
                   int(num_q.max()) if max_q is None else max_q)
