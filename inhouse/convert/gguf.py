"""Export a checkpoint as one GGUF file for llama.cpp (`inhouse convert --layout gguf`).

The same weights, no re-quantisation: MXFP4 experts stay MXFP4 (repacked to GGML's block layout),
attention, router, embedding and unembedding keep their bf16 (or fp32) values, 1-D tensors (norms,
biases, sinks) are fp32, as llama.cpp's own converter writes them. The `gguf` package (the
llama.cpp project's writer; `pip install 'inhouse[gguf]'`) writes the file, streamed tensor by
tensor so a 13 GB model never sits in memory.

Layout differences handled here:
  HF experts gate_up_proj [E, 2I, ...] interleave gate (even rows) and up (odd rows); GGUF has
  ffn_gate_exps and ffn_up_exps apart.
  HF MXFP4 block: 16 bytes, byte j = element 2j (low nibble) and 2j+1 (high); scales apart.
  GGML MXFP4 block: 17 bytes, [E8M0 scale, qs[16]], qs[j] = element j (low) and j+16 (high).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from inhouse.config import FULL, SLIDING, ModelConfig
from inhouse.errors import InhouseError
from inhouse.model.weights import find_checkpoint, read_tensors

ARCH = "gpt-oss"
BOS, EOS, PAD = 199998, 200002, 199999  # <|startoftext|>, <|return|>, <|endoftext|>

# HF name (after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router": "ffn_gate_inp",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise InhouseError("GGUF export needs the `gguf` package: pip install 'inhouse[gguf]'") \
            from None
    return gguf


def repack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """HF blocks (..., G, 16) + scales (..., G) -> GGML MXFP4 bytes (..., G * 17)."""
    lo, hi = blocks & 0x0F, blocks >> 4
    elems = torch.stack((lo, hi), dim=-1).flatten(-2)  # (..., G, 32) in element order
    qs = elems[..., :16] | (elems[..., 16:] << 4)  # (..., G, 16): element j and j+16
    packed = torch.cat((scales.unsqueeze(-1), qs), dim=-1)  # (..., G, 17)
    return packed.flatten(-2).contiguous().numpy()


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy shape of the bytes/values written
    dtype: np.dtype
    raw: object | None  # GGMLQuantizationType, or None to infer from dtype
    produce: Callable[[], np.ndarray]


def _float(t: torch.Tensor, gguf) -> tuple:
    """(numpy shape, dtype, raw type, producer) of a float tensor: 1-D in fp32, bf16 kept bf16."""
    if t.dim() <= 1 or t.dtype == torch.float32:
        return tuple(t.shape), np.dtype(np.float32), None, lambda: t.float().contiguous().numpy()
    if t.dtype == torch.bfloat16:
        return (tuple(t.shape), np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16,
                lambda: t.contiguous().view(torch.int16).numpy().view(np.uint16))
    return tuple(t.shape), np.dtype(np.float16), None, lambda: t.half().contiguous().numpy()


def _plan(tensors: dict[str, torch.Tensor], config: ModelConfig, gguf) -> list[_Planned]:
    plan: list[_Planned] = []

    def add(name: str, t: torch.Tensor, fp32: bool = False) -> None:  # fp32: for 2-D biases
        shape, dtype, raw, produce = _float(t.float() if fp32 else t, gguf)
        plan.append(_Planned(name, shape, dtype, raw, produce))

    def add_mxfp4(name: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        shape = (*blocks.shape[:-2], blocks.shape[-2] * 17)
        plan.append(_Planned(name, shape, np.dtype(np.uint8), gguf.GGMLQuantizationType.MXFP4,
                             lambda: repack_mxfp4(blocks, scales)))

    for hf, name in _TOP_NAMES.items():
        add(name, tensors[hf])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, name in _LAYER_NAMES.items():
            if hf.endswith(("weight", "sinks")):  # norms and sinks: 1-D, so fp32
                add(b + name, tensors[p + hf])
            else:
                add(b + name + ".weight", tensors[p + hf + ".weight"])
                add(b + name + ".bias", tensors[p + hf + ".bias"])
        e = p + "mlp.experts."
        gate_up_bias = tensors[e + "gate_up_proj_bias"]
        if e + "gate_up_proj_blocks" in tensors:
            gub, gus = tensors[e + "gate_up_proj_blocks"], tensors[e + "gate_up_proj_scales"]
            add_mxfp4(b + "ffn_gate_exps.weight", gub[:, ::2], gus[:, ::2])
            add_mxfp4(b + "ffn_up_exps.weight", gub[:, 1::2], gus[:, 1::2])
            add_mxfp4(b + "ffn_down_exps.weight", tensors[e + "down_proj_blocks"],
                      tensors[e + "down_proj_scales"])
        else:  # dense experts, stored [E, in, out]: GGUF wants [E, out, in]
            gate_up = tensors[e + "gate_up_proj"]
            add(b + "ffn_gate_exps.weight", gate_up[..., ::2].transpose(1, 2))
            add(b + "ffn_up_exps.weight", gate_up[..., 1::2].transpose(1, 2))
            add(b + "ffn_down_exps.weight", tensors[e + "down_proj"].transpose(1, 2))
        add(b + "ffn_gate_exps.bias", gate_up_bias[:, ::2], fp32=True)
        add(b + "ffn_up_exps.bias", gate_up_bias[:, 1::2], fp32=True)
        add(b + "ffn_down_exps.bias", tensors[e + "down_proj_bias"], fp32=True)
    return plan


def _metadata(writer, config: ModelConfig, name: str, gguf) -> None:
    from inhouse.convert.gguf_vocab import o200k_gguf_vocab

    c, w = config, writer
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if c.quantization == "mxfp4"
                    else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    for add, value in (
            (w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
            (w.add_block_count, c.num_hidden_layers), (w.add_feed_forward_length, c.intermediate_size),
            (w.add_expert_feed_forward_length, c.intermediate_size),
            (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
            (w.add_key_length, c.head_dim), (w.add_value_length, c.head_dim),
            (w.add_rope_freq_base, c.rope_theta), (w.add_rope_scaling_factor, c.rope_scaling_factor),
            (w.add_rope_scaling_orig_ctx_len, c.rope_original_max_position),
            (w.add_rope_scaling_yarn_beta_fast, c.rope_beta_fast),
            (w.add_rope_scaling_yarn_beta_slow, c.rope_beta_slow),
            (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_expert_count, c.num_experts),
            (w.add_expert_used_count, c.experts_per_token), (w.add_sliding_window, c.sliding_window)):
        add(value)
    tokens, types, merges = o200k_gguf_vocab()
    if c.vocab_size != len(tokens):
        raise InhouseError(f"vocab_size {c.vocab_size} is not o200k's {len(tokens)}: GGUF export "
                           "writes the o200k tokenizer")
    for add, value in ((w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "gpt-4o"),
                       (w.add_token_list, list(tokens)), (w.add_token_types, list(types)),
                       (w.add_token_merges, list(merges)), (w.add_bos_token_id, BOS),
                       (w.add_eos_token_id, EOS), (w.add_pad_token_id, PAD)):
        add(value)


def export_gguf(src: str | Path, dst: str | Path) -> Path:
    """Write the checkpoint at `src` as the GGUF file `dst` (written to `dst.partial`, renamed at
    the end). Returns `dst`."""
    gguf = _gguf()
    dst = Path(dst)
    if dst.exists():
        raise InhouseError(f"{dst} exists: choose a new file name")
    info = find_checkpoint(src)
    if info.int8:
        raise InhouseError(f"{src} holds int8 weights, which GGUF's gpt-oss graph does not "
                           "take: export the checkpoint it was made from")
    c = info.config
    alternating = tuple(SLIDING if i % 2 == 0 else FULL for i in range(c.num_hidden_layers))
    if c.layer_types != alternating:
        raise InhouseError("llama.cpp's gpt-oss graph alternates sliding and full attention "
                           "from layer 0; this checkpoint's layer_types differ")
    tensors = read_tensors(info)
    plan = _plan(tensors, c, gguf)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _metadata(writer, c, Path(src).resolve().name, gguf)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, t.dtype, int(np.prod(t.shape)) * t.dtype.itemsize,
                                   raw_dtype=t.raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(t.produce())
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst
