"""Our model against two independent reference implementations (test-only dependencies):
HF transformers' GptOssForCausalLM and the PyPI gpt-oss package's gpt_oss.torch."""

from __future__ import annotations

import pytest
import torch

from inhouse.model import load_model
from inhouse.model.generate import greedy
from tests.conftest import random_ids

pytestmark = pytest.mark.oracle
TOL = 1e-4  # fp32 logits, max |diff|


def _transformers_model(path, device="cpu"):
    transformers = pytest.importorskip("transformers")
    kwargs = {"dtype": torch.float32}
    if (path / "model.safetensors.index.json").exists() or any(
            "blocks" in n for n in _names(path)):
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(path, **kwargs).float().to(device)
    model.eval()
    return lambda ids: model(ids[None].to(device)).logits[0].cpu()


def _names(path):
    from safetensors import safe_open
    names = []
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names += list(h.keys())
    return names


def _gpt_oss_model(path, device="cpu"):
    ref = pytest.importorskip("gpt_oss.torch.model", reason="pip install --no-deps "
                              "--ignore-requires-python gpt-oss==0.0.9 (make setup-test does)")
    model = ref.Transformer.from_checkpoint(str(path), device=device).float()
    model.eval()
    return lambda ids: model(ids.to(device)).cpu()


def _oracle(kind, path, device="cpu"):
    return _gpt_oss_model(path, device) if kind == "gpt_oss" else _transformers_model(path, device)


def _ours(path, device):
    model = load_model(path, device=device)
    return model, lambda ids: model(ids.to(device)).cpu()


def _greedy_no_cache(forward, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.inference_mode():
            ids.append(int(forward(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


CASES = [("transformers", "hf"), ("transformers", "hf-sharded"), ("transformers", "hf-bf16"),
         ("gpt_oss", "original")]


@pytest.mark.parametrize("oracle, layout", CASES)
def test_logits_match_oracle(checkpoints, tiny_config, oracle, layout, device):
    ids = random_ids(3 * tiny_config.sliding_window + 5, tiny_config.vocab_size, seed=11)
    ref = _oracle(oracle, checkpoints[layout], device)
    with torch.inference_mode():
        ours = _ours(checkpoints[layout], device)[1](ids)
        theirs = ref(ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("oracle, layout", [("transformers", "hf"), ("gpt_oss", "original")])
def test_logits_match_oracle_with_the_real_128_window(window128_checkpoints, oracle, layout,
                                                     device):
    path = window128_checkpoints[layout]
    model, ours = _ours(path, device)
    ids = random_ids(150, model.config.vocab_size, seed=12)
    ref = _oracle(oracle, path, device)
    with torch.inference_mode():
        assert (ours(ids) - ref(ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("oracle, layout", [("transformers", "hf"), ("gpt_oss", "original")])
def test_greedy_decoding_with_our_kv_cache_matches_oracle(checkpoints, tiny_config, oracle, layout,
                                                          device):
    prompt = random_ids(24, tiny_config.vocab_size, seed=13).tolist()  # 24 + 32 > window 16
    ours = greedy(load_model(checkpoints[layout], device=device), prompt, 32)
    assert ours == _greedy_no_cache(_oracle(oracle, checkpoints[layout], device), prompt, 32)


def test_greedy_decoding_across_the_128_window(window128_checkpoints, device):
    path = window128_checkpoints["original"]
    model = load_model(path, device=device)
    prompt = random_ids(110, model.config.vocab_size, seed=14).tolist()  # crosses 128 while decoding
    assert greedy(model, prompt, 32) == _greedy_no_cache(_gpt_oss_model(path, device), prompt, 32)
