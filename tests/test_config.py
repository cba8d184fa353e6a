import json

import pytest

from inhouse.config import FULL, SLIDING, ModelConfig, preset
from inhouse.errors import ConfigError

# config.json of openai/gpt-oss-20b as published on the hub (legacy rope_scaling + rope_theta).
HUB_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": [SLIDING, FULL] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                                                       "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"],
                            "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0",
    "use_cache": True, "vocab_size": 201088,
}

ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


def test_hub_config_parses_to_the_20b_preset():
    assert ModelConfig.from_hf_dict(HUB_20B) == preset("gpt-oss-20b")


def test_original_config_parses_to_the_same_model():
    assert ModelConfig.from_original_dict(ORIGINAL_20B) == preset("gpt-oss-20b")


def test_transformers5_rope_parameters_form_is_accepted():
    d = dict(HUB_20B)
    rope = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    d["rope_parameters"] = rope
    assert ModelConfig.from_hf_dict(d) == preset("gpt-oss-20b")


def test_config_written_by_transformers_is_accepted(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(num_hidden_layers=4, num_local_experts=8, hidden_size=64,
                                    intermediate_size=64, head_dim=16, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=1024)
    cfg.save_pretrained(tmp_path)
    ours = ModelConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    assert ours.num_experts == 8 and ours.hidden_size == 64
    assert ours.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert ours.rope_scaling_factor == 32.0 and ours.rope_theta == 150000


@pytest.mark.parametrize("cfg", [preset("gpt-oss-20b"), preset("gpt-oss-120b"), preset("tiny")])
def test_round_trips(cfg):
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_original_dict(cfg.to_original_dict()) == cfg


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"hidden_size": 2881}, "hidden_size"),
    ({"intermediate_size": 100}, "intermediate_size"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"num_experts_per_tok": 2}, "num_experts_per_tok"),
    ({"layer_types": [SLIDING] * 3}, "layer_types"),
    ({"layer_types": ["local"] * 24}, "layer_types"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "foo": 1}}, "foo"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_bad_hf_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(HUB_20B | change)


def test_missing_field_is_named():
    d = dict(HUB_20B)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("change, field", [
    ({"extra": 1}, "extra"), ({"hidden_size": 65}, "hidden_size"),
    ({"experts_per_token": 64}, "experts_per_token"),
])
def test_bad_original_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_original_dict(ORIGINAL_20B | change)


def test_windows_follow_layer_types():
    cfg = preset("gpt-oss-20b")
    assert cfg.window(0) == 128 and cfg.window(1) is None and cfg.num_key_value_groups == 8
