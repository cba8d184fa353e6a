"""A mixture-of-experts layer straight from MXFP4-packed experts, in three Triton kernels.

The plan (built on the device, no host sync): the N*k (row, slot) pairs are sorted by expert
(stable) and cut into tiles of BLOCK_M pairs of one expert. The grid is sized for the most tiles
any routing can need (cdiv(N*k, BLOCK_M) + E); tiles past the real ones return at once.
1. gate_up: a tile's rows (gathered) times W1[e]^T, decoded BLOCK_K columns at a time from the
   packed bytes, + bias, then the clamped SwiGLU of each (gate, up) column pair -> h (N*k, I),
   in sorted order, rounded to the rows' dtype (as the PyTorch path rounds it).
2. down: h times W2[e]^T + bias, times the pair's routing weight -> y (N*k, H) fp32, each pair at
   its own slot (row*k + j).
3. combine: each row's k slots summed in slot order (no atomics: the same bits on every run).

Batch invariance (reproducible mode): a row's products are reduced over K in fixed BLOCK_K steps
by `tl.dot`, whose rows never mix, whatever else shares its tile; no split-K, and no tile size
depends on the batch. Decode (one row per expert, a mostly empty tile) and prefill (full tiles)
therefore run the same arithmetic for a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inhouse.kernels.cuda import dot_in_fp32

BLOCK_M = 16  # pairs per tile: tl.dot's smallest M
BLOCK_N = 64  # output columns per program (even: SwiGLU pairs stay in one tile)


@triton.jit
def _fp4_values(codes):
    """uint8 E2M1 codes 0..15 -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6, then the same negated."""
    c = codes.to(tl.int32)
    mag = c & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    power = tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    v = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * power)
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _decode_tile(blocks_ptr, scales_ptr, offs_n, mask_n, k0, K,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One expert's weights (BLOCK_N out rows, BLOCK_K inputs from k0) in fp32, exact.
    blocks (OUT, K/2) bytes: low nibble = element 2j, high = 2j+1; scales (OUT, K/32) E8M0:
    2^(s-127), built as the float whose exponent bits are s."""
    OUT_BYTES: tl.constexpr = BLOCK_K // 2
    OUT_SCALES: tl.constexpr = BLOCK_K // 32
    n64 = offs_n.to(tl.int64)
    byte_cols = k0 // 2 + tl.arange(0, OUT_BYTES)
    packed = tl.load(blocks_ptr + n64[:, None] * (K // 2) + byte_cols[None, :],
                     mask=mask_n[:, None], other=0)  # (BN, BK/2) uint8
    low = _fp4_values(packed & 15)
    high = _fp4_values(packed >> 4)
    w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # element 2j, 2j+1 side by side
    scale_cols = k0 // 32 + tl.arange(0, OUT_SCALES)
    s = tl.load(scales_ptr + n64[:, None] * (K // 32) + scale_cols[None, :],
                mask=mask_n[:, None], other=127).to(tl.int32)
    factor = (s << 23).to(tl.float32, bitcast=True)  # (BN, BK/32)
    w = tl.reshape(w, (BLOCK_N, OUT_SCALES, 32)) * factor[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, OUT, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """This program's tile: its expert, pair range [start, end), and output columns."""
    t = tl.program_id(0)
    e, start = tl.load(tile_expert_ptr + t), tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, start, end, offs_m, offs_m < end, offs_n, offs_n < OUT


@triton.jit
def _expert_rows(a_ptr, a_rows, mask_m, e, blocks_ptr, scales_ptr, bias_ptr, offs_n, mask_n, K,
                 OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32: rows a_rows of A (K apart) times expert e's W^T, plus its bias."""
    e64 = e.to(tl.int64)
    blocks_ptr += e64 * OUT * (K // 2)
    scales_ptr += e64 * OUT * (K // 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None], other=0.0)
        w = _decode_tile(blocks_ptr, scales_ptr, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    bias = tl.load(bias_ptr + e64 * OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _gate_up_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, h_ptr, pair_row_ptr,
                    tile_expert_ptr, tile_start_ptr, tile_end_ptr, K, OUT, alpha, limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr):
    e, start, end, offs_m, mask_m, offs_n, mask_n = _tile(
        tile_expert_ptr, tile_start_ptr, tile_end_ptr, OUT, BLOCK_M, BLOCK_N)
    if start >= end:
        return
    rows = tl.load(pair_row_ptr + offs_m, mask=mask_m, other=0)
    acc = _expert_rows(x_ptr, rows, mask_m, e, blocks_ptr, scales_ptr, bias_ptr, offs_n, mask_n,
                       K, OUT, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even, odd columns
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    h = (up + 1.0) * (gate * tl.sigmoid(alpha * gate))
    offs_h = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    half = OUT // 2
    tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * half + offs_h[None, :],
             h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_h < half)[None, :])


@triton.jit
def _down_kernel(h_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, pair_slot_ptr, pair_weight_ptr,
                 tile_expert_ptr, tile_start_ptr, tile_end_ptr, K, OUT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    e, start, end, offs_m, mask_m, offs_n, mask_n = _tile(
        tile_expert_ptr, tile_start_ptr, tile_end_ptr, OUT, BLOCK_M, BLOCK_N)
    if start >= end:
        return
    acc = _expert_rows(h_ptr, offs_m, mask_m, e, blocks_ptr, scales_ptr, bias_ptr, offs_n, mask_n,
                       K, OUT, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    weight = tl.load(pair_weight_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    slots = tl.load(pair_slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    tl.store(y_ptr + slots[:, None] * OUT + offs_n[None, :], acc * weight[:, None],
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # slot order: the same sum whatever the batch
        acc += tl.load(y_ptr + (row * TOP_K + j) * H + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def block_k(k: int) -> int:
    """Inputs decoded per step: a multiple of 32 (one scale) that divides k."""
    for size in (128, 64, 32):
        if k % size == 0:
            return size
    raise ValueError(f"MXFP4 inputs must be a multiple of 32, not {k}")


def plan(indices: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """indices (N, k) -> the tiles: pairs sorted by expert (`pair_slot`: each pair's slot
    row*k + j; `pair_row`: its row) and, per tile, its expert and pair range [start, end).
    Torch ops on the device only: the number of tiles is bounded, not counted, so nothing waits."""
    N, k = indices.shape
    flat = indices.reshape(-1)
    pair_slot = torch.argsort(flat, stable=True)  # (N*k,)
    # NOTE: not torch.bincount, which reads the largest index back to the host on CUDA (a sync,
    # and no CUDA graph could hold it); integer scatter-adds give the same counts every time
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.long))  # (E,)
    ends = torch.cumsum(counts, 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(N * k, BLOCK_M) + num_experts, device=indices.device)
    expert = torch.searchsorted(tile_ends, t, right=True)  # num_experts: past the real tiles
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    start = ends[e] - counts[e] + (t - (tile_ends[e] - tiles[e])) * BLOCK_M
    end = torch.minimum(start + BLOCK_M, ends[e])
    zero = torch.zeros_like(start)
    i32 = torch.int32
    return {"pair_slot": pair_slot.to(i32), "pair_row": (pair_slot // k).to(i32),
            "tile_expert": e.to(i32), "tile_start": torch.where(valid, start, zero).to(i32),
            "tile_end": torch.where(valid, end, zero).to(i32)}


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
        gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        alpha: float, limit: float) -> torch.Tensor:
    """x (N, H) rows, weights/indices (N, k) from the router; gate_up = (blocks (E, 2I, H/32, 16),
    scales (E, 2I, H/32), bias (E, 2I)), down likewise (E, H, I/32, 16), (E, H, I/32), (E, H)
    -> (N, H) in x's dtype: sum_j weights[:, j] * down(swiglu(gate_up(x)))."""
    N, H = x.shape
    k = indices.shape[1]
    b1, s1, bias1 = gate_up
    b2, s2, bias2 = down
    E, two_i = b1.shape[0], b1.shape[1]
    x = x.contiguous()
    p = plan(indices, E)
    ieee = dot_in_fp32(x.dtype)
    grid_tiles = p["tile_start"].shape[0]
    h = torch.empty(N * k, two_i // 2, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(grid_tiles, triton.cdiv(two_i, BLOCK_N))](
        x, b1.contiguous(), s1.contiguous(), bias1, h, p["pair_row"], p["tile_expert"],
        p["tile_start"], p["tile_end"], H, two_i, float(alpha), float(limit),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k(H), IEEE=ieee)
    y = torch.empty(N * k, H, dtype=torch.float32, device=x.device)
    pair_weight = weights.reshape(-1)[p["pair_slot"].long()].float().contiguous()
    _down_kernel[(grid_tiles, triton.cdiv(H, BLOCK_N))](
        h, b2.contiguous(), s2.contiguous(), bias2, y, p["pair_slot"], pair_weight,
        p["tile_expert"], p["tile_start"], p["tile_end"], two_i // 2, H,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k(two_i // 2), IEEE=ieee)
    out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    _combine_kernel[(N, triton.cdiv(H, 256))](y, out, H, TOP_K=k, BLOCK=256)
    return out
