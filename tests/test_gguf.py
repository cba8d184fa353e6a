"""GGUF export: read back with the `gguf` package (llama.cpp's own reader and MXFP4 reference),
the o200k tokenizer in GGUF form, and, where llama-cpp-python is installed, llama.cpp itself
running the exported file against inhouse."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from inhouse.convert.gguf import export_gguf, repack_mxfp4
from inhouse.errors import InhouseError
from inhouse.model.mxfp4 import dequantize
from inhouse.model.weights import find_checkpoint, read_tensors

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return export_gguf(checkpoints["hf"], path)


@pytest.fixture(scope="module")
def reader(exported):
    """Read once: gguf's reader walks all 201,088 vocabulary strings (several seconds)."""
    return gguf.GGUFReader(exported)


def _field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return len(f.data)
    return f.parts[f.data[0]][0]


def test_metadata_says_what_llama_cpp_reads(reader, tiny_config):
    r = reader
    c = tiny_config
    assert _field(r, "general.architecture") == "gpt-oss"
    assert _field(r, "gpt-oss.block_count") == c.num_hidden_layers
    assert _field(r, "gpt-oss.embedding_length") == c.hidden_size
    assert _field(r, "gpt-oss.expert_feed_forward_length") == c.intermediate_size
    assert _field(r, "gpt-oss.attention.head_count_kv") == c.num_key_value_heads
    assert _field(r, "gpt-oss.attention.sliding_window") == c.sliding_window
    assert _field(r, "gpt-oss.expert_used_count") == c.experts_per_token
    assert _field(r, "gpt-oss.rope.scaling.type") == "yarn"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-4o"
    assert _field(r, "tokenizer.ggml.tokens") == 201088
    assert _field(r, "tokenizer.ggml.eos_token_id") == 200002  # <|return|>


def test_tensors_are_the_same_weights(reader, checkpoints, tiny_config):
    """Every weight read back equals the source: MXFP4 decoded by gguf's own reference (ggml's
    layout), bf16 bit for bit, gate and up split from HF's interleaved gate_up."""
    src = read_tensors(find_checkpoint(checkpoints["hf"]))
    got = {t.name: t for t in reader.tensors}
    n_layers = tiny_config.num_hidden_layers
    assert len(got) == 3 + n_layers * 19
    for i in range(n_layers):
        p, b = f"model.layers.{i}.mlp.experts.", f"blk.{i}."
        full = dequantize(src[p + "gate_up_proj_blocks"], src[p + "gate_up_proj_scales"])
        down = dequantize(src[p + "down_proj_blocks"], src[p + "down_proj_scales"])
        for name, want in (("ffn_gate_exps", full[:, ::2]), ("ffn_up_exps", full[:, 1::2]),
                           ("ffn_down_exps", down)):
            t = got[f"{b}{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.array_equal(values, want.numpy()), name
        bias = src[p + "gate_up_proj_bias"]
        assert np.array_equal(got[f"{b}ffn_up_exps.bias"].data, bias[:, 1::2].float().numpy())
        q = got[f"{b}attn_q.weight"]
        assert q.tensor_type == gguf.GGMLQuantizationType.BF16
        assert np.array_equal(np.asarray(q.data).view(np.uint16).reshape(-1),
                              src[f"model.layers.{i}.self_attn.q_proj.weight"]
                              .view(torch.int16).numpy().view(np.uint16).reshape(-1))
        sinks = got[f"{b}attn_sinks.weight"]
        assert np.array_equal(sinks.data, src[f"model.layers.{i}.self_attn.sinks"].float().numpy())


def test_repack_puts_element_j_and_j_plus_16_in_one_byte():
    # HF byte 0 = 0x21: element 0 -> index 1, element 1 -> index 2; HF byte 8 = 0x43: elements
    # 16, 17 -> 3, 4. GGML: qs[j] = element j | element j+16 << 4, after the scale byte.
    blocks = torch.tensor([[[0x21] + [0] * 7 + [0x43] + [0] * 7]], dtype=torch.uint8)
    out = repack_mxfp4(blocks, torch.tensor([[127]], dtype=torch.uint8))
    assert out.tolist() == [[127, 0x31, 0x42] + [0] * 14]


def test_vocab_merges_rebuild_the_ranks():
    from inhouse.convert.gguf_vocab import CONTROL, o200k_gguf_vocab

    tokens, types, merges = o200k_gguf_vocab()
    assert len(tokens) == 201088 and tokens[200006] == "<|start|>" and types[200006] == CONTROL
    assert tokens[220] == "Ġ"  # a space, in byte-level form
    assert len(merges) == 199998 - 256  # every multi-byte token is reachable by one merge
    a, b = merges[0].split(" ")
    assert a + b in tokens[256:300]


def test_export_refuses_what_it_cannot_write(checkpoints, exported, tmp_path):
    with pytest.raises(InhouseError, match="exists"):
        export_gguf(checkpoints["hf"], exported)
    from inhouse.convert.convert import convert

    int8 = convert(checkpoints["hf"], tmp_path / "int8", "hf", quantize="int8")
    with pytest.raises(InhouseError, match="int8"):
        export_gguf(int8, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


def test_cli_exports_and_refuses_options_it_cannot_apply(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from inhouse.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(checkpoints["original"]), str(tmp_path / "o.gguf"),
                              "--layout", "gguf"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.gguf").is_file()
    res = runner.invoke(app, ["convert", str(checkpoints["hf"]), str(tmp_path / "q.gguf"),
                              "--layout", "gguf", "--quantize", "int8"])
    assert res.exit_code != 0 and "--layout gguf exports a checkpoint as it is" in res.output


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (benchmark-only dependency)")
def test_llama_cpp_runs_the_export_and_agrees_with_inhouse(exported, checkpoints):
    import llama_cpp

    from inhouse.model import load_model
    from tests.conftest import random_ids

    ids = random_ids(24, 199998, seed=9).tolist()  # longer than the 16-token window
    llm = llama_cpp.Llama(str(exported), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    with torch.inference_mode():
        ours = load_model(checkpoints["hf"])(torch.tensor(ids))
    # llama.cpp rounds activations to 8 bits for its MXFP4 and bf16 products: close, not equal
    diff = (theirs - ours).abs()
    assert diff.mean() < 0.02 * ours.abs().mean() and diff.max() < 0.1 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
