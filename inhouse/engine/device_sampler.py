"""A step's draws on the device, for the cuda backend: the logits rows never come to the host.

Penalties and grammar masks are applied on the device, kernels/cuda/sampling draws every row in
one launch, and one copy brings back the token ids with a flag per row for non-finite logits (the
step's one host sync). Logprobs, where a request asks for them, are computed there too, row by row.
A draw is keyed by the request's seed and the index of the token it draws (`draw_key`), so it
never depends on the batch: a replay of the request alone draws the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inhouse.engine.sampling import (SamplingParams, TokenLogprob, logprob_record,
                                     penalised)


@dataclass(frozen=True)
class DrawRequest:
    """One row to draw from: its logits (V,) on the device, and the request it draws for."""

    row: torch.Tensor
    params: SamplingParams
    seed: int
    step: int  # which of the request's generated tokens this is (0: the first)
    output_ids: tuple[int, ...]  # the tokens generated so far (the penalties count them)
    allowed: np.ndarray | None = None  # the grammar's mask (V,) bool, or None


@dataclass(frozen=True)
class Draw:
    token: int
    logprob: TokenLogprob | None
    is_finite: bool  # False: the model's logits held NaN or +inf (the draw means nothing)


def draw(requests: list[DrawRequest]) -> list[Draw]:
    """Draw a token for each request, in one kernel launch."""
    from inhouse.kernels.cuda import sampling

    if not requests:
        return []
    raw = torch.stack([r.row for r in requests]).float()  # (B, V)
    device, V = raw.device, raw.shape[1]
    bad = (torch.isnan(raw) | torch.isposinf(raw)).any(-1)  # (B,)
    # flagged rows are drawn from, then refused by the caller; -inf (a mask) stays -inf
    x = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=float("-inf"))
    for i, r in enumerate(requests):
        if r.params.has_penalties and r.output_ids:
            x[i] = penalised(x[i], r.params, r.output_ids)
        if r.allowed is not None:
            allowed = torch.from_numpy(r.allowed[:V]).to(device)
            x[i] = x[i].masked_fill(~allowed, float("-inf"))
    f32 = dict(dtype=torch.float32)
    params = [r.params for r in requests]
    host = (torch.tensor([p.temperature for p in params], **f32),
            torch.tensor([p.top_k for p in params], dtype=torch.int32),
            torch.tensor([p.top_p for p in params], **f32),
            torch.tensor([p.min_p for p in params], **f32),
            torch.tensor([sampling.draw_key(r.seed, r.step) for r in requests], dtype=torch.int64))
    tokens = sampling.sample(x, *(t.to(device, non_blocking=True) for t in host))
    back = torch.stack([tokens, bad.long()]).cpu()  # the one sync
    out = []
    for i, r in enumerate(requests):
        token = int(back[0, i])
        lp = (logprob_record(raw[i], token, r.params.logprobs)
              if r.params.logprobs is not None else None)
        out.append(Draw(token, lp, not bool(back[1, i])))
    return out
