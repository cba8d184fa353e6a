"""`inhouse convert`: quantisers against their references, layout round trips, merging an adapter
and re-quantising (ours vs transformers on the output), int8 weights, errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import preset
from inhouse.convert import write_random_checkpoint
from inhouse.convert.convert import convert
from inhouse.convert.quantize import quantize_int8, quantize_mxfp4, quantize_mxfp4_reference
from inhouse.errors import InhouseError
from inhouse.kernels.cpu import dense_kernel
from inhouse.model import load_model, lora
from inhouse.model.int8 import Int8Linear, int8_kernel_reference, int8_linear_reference
from inhouse.model.mxfp4 import dequantize
from inhouse.model.peft_format import attach_adapter, save_adapter
from tests.conftest import random_ids


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("conv") / "hf", preset("tiny"), "hf",
                                   seed=21)


@pytest.fixture(scope="module")
def adapter(src, tmp_path_factory):
    """A LoRA adapter with non-zero A and B on attention and experts."""
    model = load_model(src)
    spec = lora.LoraSpec(rank=4, alpha=8)
    lora.add_adapter(model, "a", spec, seed=3)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "a"):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return save_adapter(tmp_path_factory.mktemp("adapter") / "a", spec, lora.adapter_tensors(model, "a"))


def _logits(path, ids, adapter_dir=None):
    model = load_model(path)
    if adapter_dir:
        attach_adapter(model, "a", adapter_dir)
    with torch.inference_mode():
        return model(ids, adapter="a" if adapter_dir else None)


def test_mxfp4_quantiser_matches_its_reference_ties_and_zeros_included():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 96, generator=g) * torch.logspace(-3, 1, 96)
    w[0, 0, :32] = 0  # an all-zero block
    w[1, 1, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0])  # exact ties
    fast, ref = quantize_mxfp4(w), quantize_mxfp4_reference(w)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def test_weights_that_came_from_mxfp4_requantise_to_the_same_values():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 16, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (4, 16, 3), generator=g).to(torch.uint8)
    w = dequantize(blocks, scales)
    assert torch.equal(dequantize(*quantize_mxfp4(w)), w)


def test_int8_kernel_matches_its_reference():
    g = torch.Generator().manual_seed(2)
    q, scale = quantize_int8(torch.randn(48, 64, generator=g))
    layer = Int8Linear(64, 48)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(scale)
    layer.bias.data.normal_(generator=g)
    x = torch.randn(5, 64, generator=g)
    many = torch.randn(40, 64, generator=g)  # prefill-sized: torch's GEMM on converted weights
    with torch.inference_mode():
        got = layer(x)
        if dense_kernel.applies(x, q):  # decode rows: ours, rows rounded to int16
            assert torch.equal(got, int8_kernel_reference(x, q, scale, layer.bias))
        assert torch.allclose(got, int8_linear_reference(x, q, scale, layer.bias), atol=1e-3)
        assert torch.allclose(layer(many), int8_linear_reference(many, q, scale, layer.bias),
                              atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_int8_prefill_converts_the_weights_a_slab_at_a_time(monkeypatch, dtype, tol):
    """Rows above the decode kernel's: weights converted SLAB_ROWS output rows at a time (so
    the unembedding is never converted whole), the same products as the reference."""
    from inhouse.kernels.cpu import dense_kernel

    monkeypatch.setattr(dense_kernel, "SLAB_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(50, 64, generator=g))  # 3 slabs and 2 rows
    layer = Int8Linear(64, 50)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(scale)
    layer.bias.data.normal_(generator=g)
    x = torch.randn(40, 64, generator=g).to(dtype)
    with torch.inference_mode():
        got = layer(x)
    want = int8_linear_reference(x.double(), q, scale.double(), layer.bias.double())
    assert got.dtype == dtype and got.shape == (40, 50)
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("first", ["original", "hf-sharded"])
def test_layouts_round_trip_bit_for_bit(src, tmp_path, first):
    ids = random_ids(40, 2000, seed=3)
    mid = convert(src, tmp_path / "a", first)
    back = convert(mid, tmp_path / "b", "hf")
    assert torch.equal(_logits(back, ids), _logits(src, ids))


def test_merge_and_requantise_loads_in_ours_and_transformers_alike(src, adapter, tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = random_ids(40, 2000, seed=4)
    merged = convert(src, tmp_path / "m", "hf", merge_adapter=adapter, quantize="mxfp4")
    ours = _logits(merged, ids)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        merged, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).float()
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4
    # the merge moved the model toward base + adapter (MXFP4 rounding loses part of it)
    base, with_adapter = _logits(src, ids), _logits(src, ids, adapter)
    assert (ours - with_adapter).norm() < (base - with_adapter).norm()


def test_merge_into_dense_bf16_is_the_exact_sum_rounded_once(src, adapter, tmp_path):
    from inhouse.model.peft_format import load_adapter
    from inhouse.model.weights import find_checkpoint, read_tensors

    merged = convert(src, tmp_path / "m", "hf-bf16", merge_adapter=adapter)
    spec, ad = load_adapter(adapter)
    before, after = read_tensors(find_checkpoint(src)), read_tensors(find_checkpoint(merged))
    q = "model.layers.1.self_attn.q_proj"
    want = (before[q + ".weight"].float() + lora.merged_delta(ad[q + ".lora_A"], ad[q + ".lora_B"],
                                                              spec.scale)).to(torch.bfloat16)
    assert torch.equal(after[q + ".weight"], want)
    e = "model.layers.2.mlp.experts.down_proj"
    dense = dequantize(before[e + "_blocks"], before[e + "_scales"]) + lora.merged_delta(
        ad[e + ".lora_A"], ad[e + ".lora_B"], spec.scale)  # (E, out, in)
    assert torch.equal(after[e], dense.transpose(1, 2).to(torch.bfloat16))
    # and the model follows the adapter, up to that bf16 rounding
    ids = random_ids(40, 2000, seed=5)
    with_adapter, base = _logits(src, ids, adapter), _logits(src, ids)
    err = (_logits(merged, ids) - with_adapter).abs().max()
    assert err < 0.25 * (with_adapter - base).abs().max()


def test_int8_checkpoint_loads_natively_and_stays_close(src, tmp_path):
    ids = random_ids(40, 2000, seed=6)
    path = convert(src, tmp_path / "q", "hf", quantize="int8")
    model = load_model(path)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    ref = _logits(src, ids)
    with torch.inference_mode():
        got = model(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert kl.item() < 1e-2 and agree >= 0.9, (kl, agree)


def test_conversion_errors_are_one_line_and_write_nothing(src, adapter, tmp_path):
    runner = CliRunner()
    cases = [
        (["convert", str(src), str(tmp_path / "x"), "--merge-adapter", str(adapter)], "--quantize mxfp4"),
        (["convert", str(src), str(tmp_path / "x"), "--layout", "original", "--quantize", "int8"],
         "HF layouts only"),
        (["convert", str(src), str(tmp_path / "x"), "--quantize", "fp3"], "--quantize must be"),
        (["convert", str(src), str(tmp_path / "x"), "--merge-adapter", str(tmp_path)], "not a LoRA adapter"),
    ]
    for args, says in cases:
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x").exists()


def test_an_adapter_for_another_shape_is_refused(src, tmp_path):
    other = write_random_checkpoint(tmp_path / "w128", preset("tiny-window128"), "hf", seed=1)
    model = load_model(other)
    spec = lora.LoraSpec(rank=2, alpha=2)
    lora.add_adapter(model, "a", spec)
    wrong = save_adapter(tmp_path / "wrong", spec, lora.adapter_tensors(model, "a"))
    with pytest.raises(InhouseError, match="does not fit"):
        convert(src, tmp_path / "x", "hf", merge_adapter=wrong, quantize="mxfp4")
