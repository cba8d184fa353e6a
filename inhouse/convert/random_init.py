"""Random gpt-oss checkpoints with the exact tensor layout of the real ones.

Values are scaled like a trained network's (fan-in normalised) so that activations and logits
have a useful spread; expert weights are random MXFP4 codes with per-block E8M0 scales.
Seeded and generated layer by layer, so a 20b-shaped checkpoint streams to disk in shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from inhouse.config import ModelConfig
from inhouse.convert.writer import write_checkpoint
from inhouse.model.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK

_FP4_RMS = math.sqrt(sum(v * v for v in (0, .5, 1, 1.5, 2, 3, 4, 6)) / 8)  # rms of a random code


def random_tensors(config: ModelConfig, seed: int = 0,
                   device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in checkpoint order; floats bf16, MXFP4 parts uint8. Made on
    `device` (another device's generator draws other numbers: same seed, same device, same weights)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I, V = config.num_experts, config.hidden_size, config.intermediate_size, config.vocab_size
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std + mean).to(torch.bfloat16)

    def linear(out: int, fan_in: int) -> torch.Tensor:
        return normal(out, fan_in, std=fan_in ** -0.5)

    def mxfp4(out: int, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (E, out, fan_in // BLOCK_SIZE, BYTES_PER_BLOCK),
                               generator=g, dtype=torch.uint8, device=device)
        # scale so that a weight's rms is about fan_in ** -0.5, jittered by one binade per block
        base = 127 + round(math.log2(fan_in ** -0.5 / _FP4_RMS))
        scales = (base + torch.randint(-1, 2, (E, out, fan_in // BLOCK_SIZE), generator=g,
                                             device=device)).to(torch.uint8)
        return blocks, scales

    yield "model.embed_tokens.weight", normal(V, H, std=1.0)
    for n in range(config.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        yield f"model.layers.{n}.input_layernorm.weight", normal(H, std=0.1, mean=1.0)
        yield f"{a}.q_proj.weight", linear(Hq * D, H)
        yield f"{a}.q_proj.bias", normal(Hq * D, std=0.1)
        yield f"{a}.k_proj.weight", linear(Hkv * D, H)
        yield f"{a}.k_proj.bias", normal(Hkv * D, std=0.1)
        yield f"{a}.v_proj.weight", linear(Hkv * D, H)
        yield f"{a}.v_proj.bias", normal(Hkv * D, std=0.1)
        yield f"{a}.o_proj.weight", linear(H, Hq * D)
        yield f"{a}.o_proj.bias", normal(H, std=0.1)
        yield f"{a}.sinks", normal(Hq, std=1.0)
        yield f"model.layers.{n}.post_attention_layernorm.weight", normal(H, std=0.1, mean=1.0)
        yield f"{m}.router.weight", linear(E, H)
        yield f"{m}.router.bias", normal(E, std=0.1)
        blocks, scales = mxfp4(2 * I, H)
        yield f"{m}.experts.gate_up_proj_blocks", blocks
        yield f"{m}.experts.gate_up_proj_scales", scales
        yield f"{m}.experts.gate_up_proj_bias", normal(E, 2 * I, std=0.1)
        blocks, scales = mxfp4(H, I)
        yield f"{m}.experts.down_proj_blocks", blocks
        yield f"{m}.experts.down_proj_scales", scales
        yield f"{m}.experts.down_proj_bias", normal(E, H, std=0.1)
    yield "model.norm.weight", normal(H, std=0.1, mean=1.0)
    yield "lm_head.weight", linear(V, H)


def write_random_checkpoint(path: str | Path, config: ModelConfig, layout: str = "hf",
                            seed: int = 0, max_shard_bytes: int = 2 << 30) -> Path:
    """A random checkpoint of `config`'s shape in `layout`; same seed, same weights in every layout."""
    return write_checkpoint(path, config, random_tensors(config, seed), layout, max_shard_bytes)
