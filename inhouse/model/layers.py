"""Small layers of gpt-oss: RMSNorm, YaRN rotary embedding, clamped SwiGLU."""

from __future__ import annotations

import math

import torch
from torch import nn

from inhouse.config import ModelConfig
from inhouse.kernels import backend as backends
from inhouse.kernels.backend import Seams


def seam(seams: Seams | None, name: str):
    """The backend's function for seam `name` (`seams` None: a module on its own, which runs the
    cpu backend), or None: the backend has none, or gradients are on and its kernels do not
    decline the calls that need one themselves (they have no backward; training takes the
    model's own paths)."""
    seams = seams or backends.default_seams()
    if torch.is_grad_enabled() and not seams.grad_aware:
        return None
    return getattr(seams, name)


def through(seams: Seams | None, name: str, *args):
    """The backend's result for this call at seam `name`, or None: the model's own path then."""
    fn = seam(seams, name)
    return None if fn is None else fn(*args)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in PyTorch ops, in fp32, returned in x's dtype."""
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return (t * weight).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose calls go to its backend's `linear`
    seam (the cpu backend: a kernel for decode's rows)."""

    seams: Seams | None = None  # the backend's kernels (Transformer.use_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = through(self.seams, "linear", x, self.weight, self.bias)
        return y if y is not None else nn.functional.linear(x, self.weight, self.bias)

    def rows_independent(self, rows: int) -> bool:
        """Is each result row of a `rows`-row call computed exactly as that row alone?"""
        same = seam(self.seams, "linear_rows_independent")
        return same is not None and same(self.weight, rows)


class RMSNorm(nn.Module):
    """Computed in fp32 whatever the input dtype; the weight stays fp32 (it is tiny)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.eps = eps
        self.seams: Seams | None = None  # the backend's kernels (Transformer.use_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = through(self.seams, "rmsnorm", x, self.weight, self.eps)
        return y if y is not None else rmsnorm_reference(x, self.weight, self.eps)

    def rows_independent(self, rows: int) -> bool:
        """Is each result row computed exactly as that row alone (by_rows)?"""
        seams = self.seams or backends.default_seams()
        return (seam(seams, "rmsnorm") is not None and seams.rows_independent
                and not torch.is_grad_enabled())


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin concentration of YaRN.

    YaRN, https://arxiv.org/abs/2309.00071: dims that rotate fewer than beta_slow times over the
    original context are interpolated (freq / factor), those rotating more than beta_fast times keep
    their frequency, a linear ramp blends between. Concentration 0.1*ln(factor)+1 scales cos and sin.
    """
    dim, base = config.head_dim, config.rope_theta
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    factor = config.rope_scaling_factor
    if factor <= 1.0:
        return 1.0 / freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(config.rope_original_max_position / (num_rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low = max(correction_dim(config.rope_beta_fast), 0.0)
    high = min(correction_dim(config.rope_beta_slow), dim - 1.0)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency; 0: interpolate
    inv_freq = (1.0 / (factor * freq)) * (1 - extrapolate) + (1.0 / freq) * extrapolate
    return inv_freq, 0.1 * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed on demand (fp32), rotate-halves convention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, concentration = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.concentration = concentration

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, head_dim/2), fp32."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 seams: Seams | None = None) -> torch.Tensor:
    """x (T, H, D), cos/sin (T, D/2) -> (T, H, D): [x1*cos - x2*sin, x2*cos + x1*sin], through
    the backend's `rotary` seam where it takes the call (the cpu backend's one native call has
    these operations' roundings)."""
    y = through(seams, "rotary", x, cos, sin)
    return y if y is not None else apply_rotary_reference(x, cos, sin)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary in PyTorch ops."""
    cos = cos[:, None, :].to(x.dtype)  # (T, 1, D/2)
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up (N, 2I) with gate = even columns, up = odd columns (interleaved) -> (N, I)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))
