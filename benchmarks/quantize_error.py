"""Error introduced by `inhouse convert`: merged adapters, MXFP4 re-quantisation, int8 weights
(whose models also meet the experts with rows rounded to int16: measured alone too).

    python benchmarks/quantize_error.py [--models tiny,gpt-oss-20b] [--prompts 8] [--tokens 64]

Each variant is compared with its reference on a fixed prompt set (seeded random ids): max and
mean |logit difference|, mean KL(reference || variant) per position, top-1 agreement. For the
20b shape (random weights, built once and cached) only int8 is measured, with the decode-step
time of both. Writes benchmarks/results/quantize_error.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import cache_dir, ensure_random_checkpoint, machine, report  # noqa: E402
from inhouse.convert.convert import convert  # noqa: E402
from inhouse.model import load_model, lora  # noqa: E402
from inhouse.model.moe import MXFP4Experts  # noqa: E402
from inhouse.model.peft_format import save_adapter  # noqa: E402


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    diff = (got - ref).abs()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "kl": kl.mean().item(),
            "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def logits(model, prompts, adapter=None) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(p, adapter=adapter).float() for p in prompts])


def random_adapter(model, path: Path, rank: int = 16) -> Path:
    """A LoRA adapter whose update is a few percent of the weights, like a short fine-tune's."""
    spec = lora.LoraSpec(rank, 2 * rank)
    lora.add_adapter(model, "a", spec, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, t in lora.adapter_tensors(model, "a").items():
            if name.endswith("lora_B"):
                t.normal_(0, 0.02 / spec.scale, generator=g)
    return save_adapter(path, spec, lora.adapter_tensors(model, "a"))


def tiny(prompts_n: int, tokens: int, work: Path) -> dict:
    base_path = cache_dir() / "tiny-random-hf"
    ensure_random_checkpoint(base_path, "tiny", "hf")
    base = load_model(base_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 20000, (tokens,), generator=g) for _ in range(prompts_n)]
    adapter = random_adapter(base, work / "adapter")
    ref, with_adapter = logits(base, prompts), logits(base, prompts, "a")
    out = {"adapter_effect": compare(ref, with_adapter)}
    variants = {
        "merge -> hf-bf16 (vs base + adapter)": ("hf-bf16", adapter, "none", with_adapter),
        "merge -> MXFP4 (vs base + adapter)": ("hf", adapter, "mxfp4", with_adapter),
        "int8 attention + unembedding, int16 rows into the experts (vs base)":
            ("hf", None, "int8", ref),
    }
    for label, (layout, merge, quantize, reference) in variants.items():
        path = convert(base_path, work / label.split()[0] / quantize, layout, merge, quantize)
        out[label] = compare(reference, logits(load_model(path), prompts))
    rows16 = load_model(base_path)
    for module in rows16.modules():
        if isinstance(module, MXFP4Experts):
            module.int16_rows = True
    out["int16 rows into the experts alone (vs base)"] = compare(ref, logits(rows16, prompts))
    dense = convert(base_path, work / "dense", "hf-bf16")
    back = convert(dense, work / "back", "hf", quantize="mxfp4")
    out["MXFP4 -> bf16 -> MXFP4 (vs base)"] = compare(ref, logits(load_model(back), prompts))
    return out


def decode_step_s(model, steps: int = 3) -> float:
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.arange(16), cache=cache)
        t0 = time.perf_counter()
        for i in range(steps):
            model(torch.tensor([100 + i]), cache=cache)
    return (time.perf_counter() - t0) / steps


def twenty_b(prompts_n: int, tokens: int, work: Path) -> dict:
    base_path = cache_dir() / "gpt-oss-20b-random-hf-sharded"
    ensure_random_checkpoint(base_path, "gpt-oss-20b", "hf-sharded")
    int8_path = cache_dir() / "gpt-oss-20b-random-int8"
    if not (int8_path / "config.json").is_file():
        print("writing the int8 variant (once) ...", flush=True)
        convert(base_path, int8_path, "hf-sharded", quantize="int8")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 20000, (tokens,), generator=g) for _ in range(prompts_n)]
    out = {}
    results = {}
    for name, path in (("bf16", base_path), ("int8", int8_path)):
        model = load_model(path, dtype=torch.bfloat16)
        results[name] = logits(model, prompts)
        out[f"decode step, {name} model (s)"] = decode_step_s(model)
        del model
    out["int8 model (vs bf16)"] = compare(results["bf16"], results["int8"])
    # NOTE: context for the line above. Random weights of this depth are chaotic: even fp32 vs
    # bf16 arithmetic on the same weights moves the logits this much, so only real weights
    # give a meaningful figure for int8 here.
    model = load_model(base_path, dtype=torch.float32)
    out["bf16 vs fp32 arithmetic, same weights (context)"] = compare(logits(model, prompts),
                                                                    results["bf16"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    data, rows = {"machine": machine()}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            res = (tiny if name == "tiny" else twenty_b)(args.prompts, args.tokens,
                                                         Path(tmp) / name)
            data[name] = res
            for label, v in res.items():
                if isinstance(v, dict):
                    rows.append((f"{name}: {label}", f"max {v['max_abs']:.3g}  mean {v['mean_abs']:.3g}  "
                                 f"KL {v['kl']:.2e}  top-1 {v['top1_agree']:.3f}"))
                else:
                    rows.append((f"{name}: {label}", f"{v:.3f}"))
    report("error introduced by convert (fixed prompt set)", rows, data, "quantize_error")


if __name__ == "__main__":
    main()
