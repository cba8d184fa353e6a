"""Sampling on the device, in one Triton kernel with a program per row: only the chosen token ids
come back to the host, not a row of logits per sequence per step.

The draw is an exponential race: token = argmax_v p_v / E_v with E_v = -ln u_v, u_v uniform in
(0, 1). That is an exact sample from p restricted to the kept tokens (the first of independent
exponential clocks of rates p_v to ring), with no sort and no cumulative sum. u_v comes from
Philox (Triton's `tl.randint`, counter v) under a 64-bit key per row, `draw_key(seed, step)`: a
draw depends on its row, its request's seed and which of the request's tokens it is, never on
the batch.

Filters, as engine.sampling.sample's: temperature, top-k (values tied with the k-th stay), min-p
(p_v below min_p times the largest p is dropped), top-p (a token stays while the mass of strictly
more likely tokens is below top_p: tokens tied at the cut stay or go together). The k-th value and
the top-p cut are found by bisection over the bit patterns of the floats, which is exact: 32
passes over the row, each summing in a fixed order (BLOCK lanes, then the lanes in one tl.sum).

`sample_reference` is the same arithmetic in PyTorch and NumPy (its own Philox), row by row.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 2048  # vocabulary entries per pass step; fixed, so a row's sums never depend on the batch
# Triton's interpreter pays per step, not per entry: it takes longer steps (its sums, like its
# exp and log, are numpy's: interpreted draws are not a GPU's bits in any case)
INTERPRETER_BLOCK = 65536
GREEDY_BELOW = 1e-5  # engine.sampling.GREEDY_BELOW: a temperature below it is greedy


def draw_key(seed: int, step: int) -> int:
    """The Philox key of draw number `step` (0: the first generated token) of a request seeded
    `seed`, as a signed 64-bit integer."""
    digest = hashlib.blake2b(f"inhouse-draw:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@triton.jit
def _key(x):
    """fp32 -> int32 in the floats' order (-0.0 must be made +0.0 first)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _row(x_ptr, start, V, inv_t, BLOCK: tl.constexpr):
    """Entries start..start+BLOCK of the row over the temperature (-inf past the end), -0.0 as
    +0.0."""
    offs = start + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf"))
    return x * inv_t + 0.0, offs


@triton.jit
def _kept(x, kth, m, inv_z, floor):
    """p of the entries x top-k and min-p keep (0 for the others)."""
    p = tl.where(_key(x).to(tl.int64) >= kth, tl.exp(x - m) * inv_z, 0.0)
    return tl.where(p < floor, 0.0, p)


@triton.jit
def _sample_kernel(x_ptr, stride, V, out_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                   key_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_ptr += row.to(tl.int64) * stride
    temperature = tl.load(temp_ptr + row)
    n_blocks = tl.cdiv(V, BLOCK)
    if temperature < 1e-5:  # greedy: the first of the largest
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.full((), 0, tl.int32)
        for b in range(n_blocks):
            x, offs = _row(x_ptr, b * BLOCK, V, 1.0, BLOCK)
            m = tl.max(x, axis=0)
            i = tl.argmax(x, axis=0) + b * BLOCK
            take = (m > best) | ((b == 0) & (m == best))
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        tl.store(out_ptr + row, best_i.to(tl.int64))
        return
    inv_t = 1.0 / temperature
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    key = tl.load(key_ptr + row)
    # the largest value, and with top-k the k-th largest: the largest key t with count(>= t) >= k
    vmax = tl.full((BLOCK,), float("-inf"), tl.float32)
    for b in range(n_blocks):
        x, offs = _row(x_ptr, b * BLOCK, V, inv_t, BLOCK)
        vmax = tl.maximum(vmax, x)
    m = tl.max(vmax, axis=0)
    kth = tl.full((), -2147483648, tl.int64)
    if (top_k > 0) & (top_k < V):
        lo = kth
        hi = _key(m).to(tl.int64) + 1  # count(>= hi) = 0 < k
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            count = tl.zeros((BLOCK,), tl.int32)
            for b in range(n_blocks):
                x, offs = _row(x_ptr, b * BLOCK, V, inv_t, BLOCK)
                count += (_key(x).to(tl.int64) >= mid).to(tl.int32)
            enough = tl.sum(count, axis=0) >= top_k
            lo = tl.where(enough & (hi - lo > 1), mid, lo)
            hi = tl.where(~enough & (hi - lo > 1), mid, hi)
        kth = lo
    # softmax's denominator over what top-k kept
    acc = tl.zeros((BLOCK,), tl.float32)
    for b in range(n_blocks):
        x, offs = _row(x_ptr, b * BLOCK, V, inv_t, BLOCK)
        acc += tl.where(_key(x).to(tl.int64) >= kth, tl.exp(x - m), 0.0)
    inv_z = 1.0 / tl.sum(acc, axis=0)
    floor = min_p * inv_z  # min-p: the largest p is e^0 / Z
    # top-p: the smallest key t of p with mass(p > t) < top_p; p_v stays when key(p_v) >= t
    cut = tl.full((), -1, tl.int64)
    if top_p < 1.0:
        lo = cut  # mass(p > lo) >= top_p, or lo is -1
        hi = (inv_z.to(tl.int32, bitcast=True)).to(tl.int64)  # mass(p > the largest) = 0
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros((BLOCK,), tl.float32)
            for b in range(n_blocks):
                x, offs = _row(x_ptr, b * BLOCK, V, inv_t, BLOCK)
                p = _kept(x, kth, m, inv_z, floor)
                mass += tl.where(p.to(tl.int32, bitcast=True).to(tl.int64) > mid, p, 0.0)
            below = tl.sum(mass, axis=0) < top_p
            hi = tl.where(below & (hi - lo > 1), mid, hi)
            lo = tl.where(~below & (hi - lo > 1), mid, lo)
        cut = hi
    # the race among the kept tokens
    best = tl.full((), -1.0, tl.float32)
    best_i = tl.full((), 0, tl.int32)
    for b in range(n_blocks):
        x, offs = _row(x_ptr, b * BLOCK, V, inv_t, BLOCK)
        p = _kept(x, kth, m, inv_z, floor)
        p = tl.where(p.to(tl.int32, bitcast=True).to(tl.int64) >= cut, p, 0.0)
        r = tl.randint(key, offs)
        u = (((r >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(offs < V, p / -tl.log(u), -1.0)
        s = tl.max(score, axis=0)
        i = tl.argmax(score, axis=0) + b * BLOCK
        take = s > best
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, s, best)
    tl.store(out_ptr + row, best_i.to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, keys: torch.Tensor,
           block: int | None = None) -> torch.Tensor:
    """logits (B, V) fp32 (penalties and masks applied; no NaN or +inf), per row: temperature,
    top_p, min_p (B,) fp32, top_k (B,) int32 (0: off), keys (B,) int64 (`draw_key`)
    -> token ids (B,) int64, on the logits' device. `block`: tests only."""
    if block is None:
        block = INTERPRETER_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else BLOCK
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        _sample_kernel[(B,)](logits, logits.stride(0), V, out, temperature, top_k, top_p, min_p,
                             keys, BLOCK=block)
    return out


# ---- the reference ---------------------------------------------------------------------------
_PHILOX = (0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57)


def uniforms_reference(key: int, n: int) -> np.ndarray:
    """u_0..u_{n-1} of a row keyed `key`: Philox-4x32-10 of counter (v, 0, 0, 0) under the key's
    two 32-bit halves, as tl.randint draws them, then the top 24 bits centred in (0, 1)."""
    key_a, key_b, round_a, round_b = (np.uint64(c) for c in _PHILOX)
    low = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    c0 = np.arange(n, dtype=np.uint64)
    c1 = c2 = c3 = np.zeros(n, dtype=np.uint64)
    for _ in range(10):
        a, b = round_a * c0, round_b * c2  # < 2**64: exact in uint64
        c0, c1, c2, c3 = (b >> np.uint64(32)) ^ c1 ^ k0, b & low, (a >> np.uint64(32)) ^ c3 ^ k1, a & low
        k0, k1 = (k0 + key_a) & low, (k1 + key_b) & low
    return (((c0 >> np.uint64(8)).astype(np.float32) + np.float32(0.5))
            * np.float32(1 / 16777216)).astype(np.float32)


def sample_reference(row: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     min_p: float, key: int) -> int:
    """The kernel's draw for one row (V,) fp32, in PyTorch ops (sums in another order, so a draw
    at a rounding's edge may differ)."""
    if temperature < GREEDY_BELOW:
        return int(row.argmax())
    x = row.float() * (1.0 / torch.tensor(temperature, dtype=torch.float32)) + 0.0
    if 0 < top_k < x.shape[0]:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    p = torch.exp(x - x.max())
    p = p * (1.0 / p.sum())
    p = p.masked_fill(p < min_p * p.max(), 0.0)
    if top_p < 1.0:
        ascending = p.sort().values
        above = ascending.flip(0).cumsum(0).flip(0)  # above[i]: mass of ascending[i:]
        first_greater = torch.searchsorted(ascending, p, right=True)
        mass = torch.cat([above, torch.zeros(1)])[first_greater]  # of strictly larger p
        p = p.masked_fill(mass >= top_p, 0.0)
    u = torch.from_numpy(uniforms_reference(key, x.shape[0]))
    return int((p / -torch.log(u)).argmax())

