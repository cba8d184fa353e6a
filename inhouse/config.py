"""Typed, frozen configs. `ModelConfig` reads both gpt-oss `config.json` layouts.

HF layout (`openai/gpt-oss-20b`): `model_type: gpt_oss`, `layer_types`, YaRN in the legacy
`rope_scaling` (+ top-level `rope_theta`) or, as transformers 5 writes it, `rope_parameters`.
`original/` layout (what `gpt_oss.torch` reads): a flat dict of 16 keys.
Any unknown or inconsistent field is a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from inhouse.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# Keys of the original/ layout, exactly as gpt_oss.torch's ModelConfig has them.
ORIGINAL_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta",
)

# HF keys we read. Generic PretrainedConfig keys (below) are accepted and ignored.
_HF_MODEL_KEYS = {
    "model_type", "num_hidden_layers", "num_local_experts", "num_experts", "experts_per_token",
    "num_experts_per_tok", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
    "num_attention_heads", "num_key_value_heads", "sliding_window", "layer_types",
    "max_position_embeddings", "initial_context_length", "rope_theta", "rope_scaling",
    "rope_parameters", "swiglu_limit", "swiglu_alpha", "rms_norm_eps", "attention_bias",
    "tie_word_embeddings", "hidden_act", "quantization_config",
}
_HF_IGNORED_KEYS = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "tf_legacy_loss",
    "use_bfloat16", "add_cross_attention", "cross_attention_hidden_size", "is_decoder",
    "pruned_heads", "torchscript", "_attn_implementation_autoset", "_commit_hash",
    "use_kernels", "num_labels",
}
_ROPE_KEYS = {"rope_type", "type", "factor", "beta_fast", "beta_slow",
              "original_max_position_embeddings", "truncate", "rope_theta", "mscale",
              "mscale_all_dim", "attention_factor"}


@dataclass(frozen=True)
class ModelConfig:
    """The gpt-oss architecture's hyper-parameters; field names follow the HF config."""

    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    layer_types: tuple[str, ...]
    max_position_embeddings: int
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position: int = 4096  # = initial_context_length
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    quantization: str | None = "mxfp4"  # experts' storage in the checkpoint: "mxfp4" or None (dense)

    def __post_init__(self) -> None:
        for f in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                  "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                  "num_key_value_heads", "sliding_window", "max_position_embeddings",
                  "rope_original_max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field '{f}' must be a positive integer, got {v!r}")
        for f in ("rope_theta", "rope_scaling_factor", "rope_beta_fast", "rope_beta_slow",
                  "swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"config field '{f}' must be a positive number, got {v!r}")
        for f in ("hidden_size", "intermediate_size"):
            if getattr(self, f) % 32:
                raise ConfigError(f"config field '{f}' = {getattr(self, f)} must be a multiple of "
                                  "32 (MXFP4 packs 32 values per block)")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' = {self.head_dim} must be even (RoPE)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' = {self.num_attention_heads} must be a "
                f"multiple of 'num_key_value_heads' = {self.num_key_value_heads} (GQA)")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"config field 'experts_per_token' = {self.experts_per_token} exceeds "
                              f"'num_experts' = {self.num_experts}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config field 'layer_types' has {len(self.layer_types)} entries, "
                              f"'num_hidden_layers' is {self.num_hidden_layers}")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise ConfigError(f"config field 'layer_types' has unknown type {bad[0]!r} "
                              f"(expected '{SLIDING}' or '{FULL}')")
        if self.quantization not in ("mxfp4", None):
            raise ConfigError(f"config field 'quantization_config.quant_method' is "
                              f"{self.quantization!r}; only 'mxfp4' is supported")
        if self.rope_scaling_factor < 1:
            raise ConfigError("config field 'rope_scaling.factor' must be >= 1")

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int | None:
        """Sliding window of `layer` (a query at q sees q-window < k <= q), or None for full."""
        return self.sliding_window if self.is_sliding(layer) else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt != "gpt_oss":
            raise ConfigError(f"config.json has model_type {mt!r}; inhouse runs gpt-oss "
                              "checkpoints only (model_type 'gpt_oss')")
        unknown = sorted(set(d) - _HF_MODEL_KEYS - _HF_IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"config.json has unknown field '{unknown[0]}' for gpt_oss")
        if d.get("tie_word_embeddings"):
            raise ConfigError("config field 'tie_word_embeddings' is true; gpt-oss has an untied "
                              "unembedding")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act' is {d['hidden_act']!r}; gpt-oss uses "
                              "'silu' (clamped SwiGLU)")
        if d.get("attention_bias", True) is not True:
            raise ConfigError("config field 'attention_bias' must be true for gpt-oss")
        num_experts = _agree(d, "num_local_experts", "num_experts")
        top_k = _agree(d, "num_experts_per_tok", "experts_per_token")
        layers = _require(d, "num_hidden_layers")
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' default: even layers slide
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        if not isinstance(layer_types, list):
            raise ConfigError("config field 'layer_types' must be a list")
        rope = _rope_from_hf(d)
        quant = d.get("quantization_config")
        if quant is not None:
            if not isinstance(quant, dict):
                raise ConfigError("config field 'quantization_config' must be an object")
            quant = quant.get("quant_method")
        initial = d.get("initial_context_length", rope.get("original_max_position_embeddings", 4096))
        return cls(
            num_hidden_layers=layers,
            num_experts=num_experts,
            experts_per_token=top_k,
            vocab_size=_require(d, "vocab_size"),
            hidden_size=_require(d, "hidden_size"),
            intermediate_size=_require(d, "intermediate_size"),
            head_dim=_require(d, "head_dim"),
            num_attention_heads=_require(d, "num_attention_heads"),
            num_key_value_heads=_require(d, "num_key_value_heads"),
            sliding_window=_require(d, "sliding_window"),
            layer_types=tuple(layer_types),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            rope_theta=rope["rope_theta"],
            rope_scaling_factor=rope["factor"],
            rope_beta_fast=rope["beta_fast"],
            rope_beta_slow=rope["beta_slow"],
            rope_original_max_position=rope.get("original_max_position_embeddings", initial),
            swiglu_limit=d.get("swiglu_limit", 7.0),
            swiglu_alpha=d.get("swiglu_alpha", 1.702),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            quantization=quant,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as the hub's gpt-oss files have it (legacy `rope_scaling` + `rope_theta`)."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_original_max_position,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": float(self.rope_beta_fast),
                "beta_slow": float(self.rope_beta_slow),
                "factor": float(self.rope_scaling_factor),
                "original_max_position_embeddings": self.rope_original_max_position,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.vocab_size > 200012:  # the harmony vocabulary: <|return|> ends, <|endoftext|> pads
            d["eos_token_id"], d["pad_token_id"] = 200002, 199999
        if self.quantization == "mxfp4":
            d["quantization_config"] = {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            }
        return d

    # ---- original/config.json ------------------------------------------------------------
    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        unknown = sorted(set(d) - set(ORIGINAL_KEYS))
        if unknown:
            raise ConfigError(f"original config.json has unknown field '{unknown[0]}'")
        for k in ORIGINAL_KEYS:
            _require(d, k)
        layers = d["num_hidden_layers"]
        initial = d["initial_context_length"]
        factor = d["rope_scaling_factor"]
        return cls(
            num_hidden_layers=layers,
            num_experts=d["num_experts"],
            experts_per_token=d["experts_per_token"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            head_dim=d["head_dim"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            sliding_window=d["sliding_window"],
            # NOTE: gpt_oss.torch slides on even layers (layer_idx % 2 == 0).
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers)),
            max_position_embeddings=int(initial * factor),
            rope_theta=d["rope_theta"],
            rope_scaling_factor=factor,
            rope_beta_fast=d["rope_ntk_beta"],
            rope_beta_slow=d["rope_ntk_alpha"],
            rope_original_max_position=initial,
            swiglu_limit=d["swiglu_limit"],
            quantization="mxfp4",
        )

    def to_original_dict(self) -> dict[str, Any]:
        expected = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
        if self.layer_types != expected:
            raise ConfigError("the original/ layout cannot express these layer_types "
                              "(it always slides on even layers)")
        return {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_max_position,
            "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow, "rope_ntk_beta": self.rope_beta_fast,
        }


def _require(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json is missing field '{key}'")
    return d[key]


def _agree(d: dict[str, Any], key: str, alias: str) -> Any:
    """Read a field that real configs carry under two names; they must agree."""
    if key in d and alias in d and d[key] != d[alias]:
        raise ConfigError(f"config fields '{key}' = {d[key]} and '{alias}' = {d[alias]} disagree")
    if key in d:
        return d[key]
    return _require(d, alias)


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """YaRN parameters from `rope_parameters` (transformers 5) or `rope_scaling` (legacy)."""
    legacy, new = d.get("rope_scaling"), d.get("rope_parameters")
    if legacy is not None and new is not None:
        shared = set(legacy) & set(new)
        for k in sorted(shared):
            if legacy[k] != new[k]:
                raise ConfigError(f"config fields 'rope_scaling.{k}' and 'rope_parameters.{k}' "
                                  "disagree")
    rope = dict(legacy or {}) | dict(new or {})
    where = "rope_parameters" if new is not None else "rope_scaling"
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"config field '{where}' has unknown key '{unknown[0]}'")
    rope_type = rope.get("rope_type", rope.get("type", "yarn" if rope else "default"))
    if "rope_theta" in rope and "rope_theta" in d and rope["rope_theta"] != d["rope_theta"]:
        raise ConfigError(f"config fields 'rope_theta' and '{where}.rope_theta' disagree")
    theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
    if rope_type == "default":
        return {"rope_theta": theta, "factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
    if rope_type != "yarn":
        raise ConfigError(f"config field '{where}.rope_type' is {rope_type!r}; gpt-oss uses 'yarn'")
    if rope.get("truncate", False):
        raise ConfigError(f"config field '{where}.truncate' is true; gpt-oss YaRN does not truncate")
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
        if k in rope:
            raise ConfigError(f"config field '{where}.{k}' is not supported (gpt-oss uses the "
                              "default YaRN concentration 0.1*ln(factor)+1)")
    out = {"rope_theta": theta, "factor": rope.get("factor", 1.0),
           "beta_fast": rope.get("beta_fast", 32.0), "beta_slow": rope.get("beta_slow", 1.0)}
    if "original_max_position_embeddings" in rope:
        out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if not math.isfinite(float(out["factor"])):
        raise ConfigError(f"config field '{where}.factor' must be finite")
    return out


def _alternating(layers: int) -> tuple[str, ...]:
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))


def preset(name: str) -> ModelConfig:
    """Model shapes by name: the real gpt-oss-20b/120b, and tiny ones for tests and demos.

    Tiny presets keep the real vocabulary (201088) so that harmony's special tokens exist.
    """
    real = dict(vocab_size=201088, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                sliding_window=128, max_position_embeddings=131072, hidden_size=2880,
                intermediate_size=2880)
    shapes = {
        "gpt-oss-20b": dict(real, num_hidden_layers=24, num_experts=32, experts_per_token=4),
        "gpt-oss-120b": dict(real, num_hidden_layers=36, num_experts=128, experts_per_token=4),
        "tiny": dict(vocab_size=201088, num_hidden_layers=4, num_experts=8, experts_per_token=4,
                     hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=16, max_position_embeddings=131072),
        "demo": dict(vocab_size=201088, num_hidden_layers=4, num_experts=8, experts_per_token=2,
                     hidden_size=128, intermediate_size=128, head_dim=32, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=128, max_position_embeddings=131072),
        "tiny-window128": dict(vocab_size=1024, num_hidden_layers=2, num_experts=4,
                               experts_per_token=2, hidden_size=128, intermediate_size=96,
                               head_dim=32, num_attention_heads=4, num_key_value_heads=1,
                               sliding_window=128, max_position_embeddings=131072),
    }
    if name not in shapes:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(shapes)}")
    s = shapes[name]
    return ModelConfig(layer_types=_alternating(s["num_hidden_layers"]), **s)


PRESETS = ("gpt-oss-20b", "gpt-oss-120b", "tiny", "demo", "tiny-window128")


ENGINE_MODES = ("reproducible", "batched")


@dataclass(frozen=True)
class EngineConfig:
    """Continuous batching and KV memory.

    mode: "reproducible" runs each sequence's chunk on its own with fixed chunk sizes, so that a
    seeded request gives bit-identical output ids alone or in any batch (the base of audit replay);
    "batched" runs all scheduled tokens in one pass (faster: each routed expert is decoded once per
    step for every sequence) but numerics then depend on the batch.

    prefix_caching: in reproducible mode a prefix is reused only in whole `prefill_chunk`s of a
    prompt, so that a hit computes the rest in the chunks a fresh request would (the same bits);
    in batched mode in `block_size` blocks, outputs included.
    """

    max_num_seqs: int = 16  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per step (decodes first, then prefill chunks)
    prefill_chunk: int = 256  # prompt tokens of one sequence per step
    kv_budget_bytes: int = 4 << 30
    block_size: int = 16  # tokens per KV block (bookkeeping granularity)
    max_waiting: int = 256  # bounded queue: more is refused (HTTP 429 later)
    mode: str = "reproducible"
    # reuse the keys and values of earlier requests' prompts (engine/prefix_cache.py)
    prefix_caching: bool = True
    # speculative decoding: up to this many draft tokens per step from the sequence's own text
    # (engine/draft.py), kept only where they equal what is sampled; 0 turns it off. Used only
    # where the model's decode step verifies several rows in one read of the weights (bf16 on
    # the native CPU kernels): elsewhere a draft costs more than it saves.
    num_draft_tokens: int = 4
    # the cuda backend on a GPU: decode steps of up to 64 sequences replayed from CUDA graphs
    # (model/cuda_graphs.py); False runs them launch by launch
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for f in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "kv_budget_bytes",
                  "block_size", "max_waiting"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"engine setting '{f}' must be a positive integer, got {v!r}")
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 0:
            raise ConfigError("engine setting 'num_draft_tokens' must be an integer >= 0, got "
                              f"{self.num_draft_tokens!r}")
        if self.mode not in ENGINE_MODES:
            raise ConfigError(f"engine setting 'mode' must be one of {ENGINE_MODES}, got {self.mode!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError("engine setting 'max_num_batched_tokens' must be >= 'max_num_seqs' "
                              "(every running sequence decodes one token per step)")


@dataclass(frozen=True)
class ServerSettings:
    """What `build_app` needs besides the engine. API keys are compared by hash, never logged."""

    model_name: str = "inhouse-demo"
    model_label: str = ""  # shown in /v1/models and the banner (e.g. "demo: tiny random weights")
    is_demo: bool = False
    api_keys: tuple[str, ...] = ()
    database_url: str = ""  # Responses store; "" -> sqlite file in the cache
    default_max_tokens: int = 4096  # when a request gives none (capped by the context window)
    max_n: int = 8
    max_body_bytes: int = 8 << 20
    log_bodies: bool = False  # NOTE: logs prompt text; off by default, loud warning when on
    # audit log: one record per request (see inhouse.governance.audit_log)
    audit: bool = True
    audit_database_url: str = ""  # "" -> sqlite file in the cache
    # "redacted": message and answer text with PII replaced by [LABEL]; "none": hashes only;
    # "full": ids and text (what replay needs). Content sits in an erasable table.
    audit_content: str = "redacted"
    pii_mode: str = "off"  # "off" | "mask" (placeholders to the model, restored) | "block" (400)
    pii_patterns: tuple[tuple[str, str], ...] = ()  # custom (LABEL, regex) detectors
    model_digest: str = ""  # sha256 over the checkpoint files
    engine_mode: str = ""
    model_dtype: str = ""  # "bfloat16" | "float32": replay needs the same arithmetic
    kernel: str = ""  # which MXFP4 path ran: "avx2-fused" | "portable" | "torch"
    retain_days: float = 0.0  # erase audit content older than this (0: keep)
    # LoRA adapters served as "MODEL:NAME": (name, sha256 digest of its files) pairs
    adapters: tuple[tuple[str, str], ...] = ()
    metrics_require_key: bool = False  # /metrics answers only requests with a valid API key
    audit_signing_key: str = ""  # the checkpoint key file ("" -> audit-signing.key in the cache)
    audit_salt: str = ""  # the hashing secret's file ("" -> audit-salt in the cache)
    audit_witness: str = ""  # a file (JSON lines) or http(s) URL each signed checkpoint goes to
    audit_seal_seconds: float = 60.0  # a checkpoint at least this often while records wait
    # built-in tools: on for every Chat Completions request (Responses asks per request)
    builtin_tools: tuple[str, ...] = ()  # of "browser", "python"
    python_timeout_s: float = 120.0  # one python execution
    python_memory_mib: int = 1024  # the sandbox's address space
    max_tool_calls: int = 8  # built-in calls the server runs in one turn
    web_ui: bool = True  # the chat page and governance console at / (their APIs stay)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("server setting 'model_name' must not be empty")
        for f in ("default_max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"server setting '{f}' must be positive")
        if self.audit_content not in ("none", "redacted", "full"):
            raise ConfigError("server setting 'audit_content' must be 'none', 'redacted' or 'full'")
        if self.pii_mode not in ("off", "mask", "block"):
            raise ConfigError("server setting 'pii_mode' must be 'off', 'mask' or 'block'")
        unknown = set(self.builtin_tools) - {"browser", "python"}
        if unknown:
            raise ConfigError(f"unknown built-in tool(s) {sorted(unknown)}: there are browser "
                              "and python")
        for f in ("python_timeout_s", "python_memory_mib", "max_tool_calls"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"server setting '{f}' must be positive")


def cache_root() -> Path:
    """inhouse's cache: $INHOUSE_CACHE, else $XDG_CACHE_HOME/inhouse, else ~/.cache/inhouse."""
    base = os.environ.get("INHOUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inhouse")
    return Path(base)
