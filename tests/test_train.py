"""Fine-tuning: harmony loss masks, data validation, a real LoRA fine-tune on a tiny MXFP4 model,
the adapter in transformers + peft, serving it through the real server, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import EngineConfig, ServerSettings, cache_root, preset
from inhouse.convert.random_init import random_tensors
from inhouse.convert.writer import write_checkpoint
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.harmony import ChatMessage, FunctionTool, PromptOptions, decode, render_prompt
from inhouse.harmony.conversation import ToolCall
from inhouse.harmony.training import render_for_training
from inhouse.kernels import arithmetic
from inhouse.model import find_checkpoint, load_model, lora
from inhouse.model.digest import checkpoint_digest
from inhouse.model.peft_format import adapter_digest, attach_adapter, load_adapter
from inhouse.server import build_app
from inhouse.train import TrainConfig, finetune, load_examples
from inhouse.train.data import DataError, parse_example
from tests.server_utils import running_server

RETURN, CALL, END = 200002, 200012, 200007
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
FACTS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]


def _conversations() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                          {"role": "assistant", "reasoning": "A simple fact.",
                           "content": f"The capital is {city}."}]} for country, city in FACTS]
    rows.append({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]})
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tiny random MXFP4 checkpoint whose unembedding has a trained model's range (x4): with the
    plain fan-in scale, |logit| <= |h| |w| ~ 8 at hidden 64, too little to single out one token
    of 201k, whatever the adapter learns."""
    cfg = preset("tiny")
    tensors = ((n, t * 4 if n == "lm_head.weight" else t) for n, t in random_tensors(cfg, seed=5))
    return write_checkpoint(tmp_path_factory.mktemp("ft") / "base", cfg, tensors, "hf")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("ftdata") / "train.jsonl", _conversations())


@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftout") / "adapter"
    cfg = TrainConfig(rank=8, alpha=16, lr=1e-2, epochs=30, batch_tokens=4096)
    return out, finetune(base, data, out, cfg, eval_path=data)


# ---- loss masks ------------------------------------------------------------------------------
def _spans(seq) -> list[str]:
    """Decoded runs of target tokens."""
    spans, run = [], []
    for t, m in zip(seq.ids, seq.mask):
        if m:
            run.append(t)
        elif run:
            spans.append(decode(run))
            run = []
    return spans + ([decode(run)] if run else [])


def test_masks_cover_exactly_what_the_model_writes():
    msgs = [ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", reasoning="Need the tool.",
                        tool_calls=(ToolCall("get_weather", '{"city":"Paris"}', "c1"),)),
            ChatMessage("tool", '{"temp":20}', tool_call_id="c1"),
            ChatMessage("assistant", "It is 20 C.", reasoning="Answer it."),
            ChatMessage("user", "Thanks"),
            ChatMessage("assistant", "You're welcome.", reasoning="Be polite.")]
    options = PromptOptions(tools=(FunctionTool("get_weather", "w", WEATHER["function"]["parameters"]),))
    first, second = render_for_training(msgs, options)
    # turn 1: both assistant runs of the tool loop, the loop's analysis kept
    assert _spans(first) == [
        "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
        "<|channel|>analysis<|message|>Answer it.<|end|><|start|>assistant<|channel|>final"
        "<|message|>It is 20 C.<|return|>"]
    # turn 2: only its own answer; turn 1's analysis is gone from the history, its final ends <|end|>
    assert _spans(second) == ["<|channel|>analysis<|message|>Be polite.<|end|><|start|>assistant"
                              "<|channel|>final<|message|>You're welcome.<|return|>"]
    text = decode(list(second.ids))
    assert "Need the tool." not in text and "Answer it." not in text
    assert "It is 20 C.<|end|>" in text
    # the unmasked part is exactly the prompt inference would render
    prompt = render_prompt(msgs[:5], options)
    assert list(second.ids[:len(prompt)]) == prompt and not any(second.mask[:len(prompt)])
    for seq in (first, second):
        last = max(i for i, m in enumerate(seq.mask) if m)
        assert seq.ids[last] == RETURN and last == len(seq.ids) - 1


def test_a_trailing_tool_call_ends_with_call():
    (seq,) = render_for_training([ChatMessage("user", "x"), ChatMessage(
        "assistant", tool_calls=(ToolCall("f", "{}"),))])
    assert seq.ids[-1] == CALL and seq.mask[-1] and END not in seq.ids[-3:]


def test_responses_items_train_like_chat_messages():
    chat = parse_example(_conversations()[-1])
    items = parse_example({"tools": [{"type": "function", **WEATHER["function"]}], "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Oslo?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'}]})
    assert render_for_training(list(chat.messages), chat.options) == \
        render_for_training(list(items.messages), items.options)


# ---- bad data --------------------------------------------------------------------------------
GOOD = json.dumps(_conversations()[0])


@pytest.mark.parametrize("bad, line, says", [
    ('{"messages": [{"role": "user", "content": "hi"}', 2, "invalid JSON"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', 2, "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", '
     '"content": "1"}, {"role": "assistant", "content": "ok"}]}', 2,
     "tool result without a preceding tool call"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}', 2,
     "an assistant message needs content"),
])
def test_bad_data_is_one_line_with_its_line_number_and_leaves_nothing(base, tmp_path, bad, line, says):
    data = _write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["finetune", "--model", str(base), "--data", str(data),
                                 "--out", str(out)])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and f"line {line}:" in lines[0] and says in lines[0], r.output
    assert not out.exists()


def test_a_non_empty_out_dir_is_refused(base, data, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        finetune(base, data, tmp_path, TrainConfig(epochs=1))
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---- a real fine-tune --------------------------------------------------------------------------
def _greedy(model, ids: list[int], adapter: str | None, n: int = 40) -> list[int]:
    cache, out = model.new_cache(), []
    with torch.inference_mode():
        logits = model(torch.tensor(ids), cache=cache, last_only=True, adapter=adapter)
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            if out[-1] in (RETURN, CALL):
                break
            logits = model(torch.tensor([out[-1]]), cache=cache, adapter=adapter)
    return out


def test_finetune_lowers_eval_loss_and_teaches_the_answers(trained, base, data):
    out, result = trained
    first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
    assert last < 0.6 * first, result.eval_losses
    model = load_model(base)
    attach_adapter(model, "ft", out)
    for ex in load_examples(data):
        prompt = render_prompt([m for m in ex.messages if m.role != "assistant"], ex.options)
        expected = [s for s in render_for_training(list(ex.messages), ex.options)][-1]
        target = [t for t, m in zip(expected.ids, expected.mask) if m]
        assert _greedy(model, prompt, "ft") == target
        assert _greedy(model, prompt, None) != target  # the base model did not know it
    summary = json.loads((out / "inhouse_training.json").read_text())
    assert summary["base_model_digest"].startswith("sha256:") and summary["steps"] == 30


def test_our_adapter_loads_in_transformers_and_peft_with_the_same_logits(trained, base):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out, _ = trained
    ours = load_model(base)
    attach_adapter(ours, "ft", out)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).float()
    theirs = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ids = torch.randint(0, 2000, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ours(ids, adapter="ft"), theirs(ids[None]).logits[0]
        assert (a - ours(ids)).abs().max() > 1.0  # the adapter really changes the model
    assert (a - b).abs().max().item() < 1e-4


def test_peft_format_round_trips(trained):
    out, _ = trained
    spec, tensors = load_adapter(out)
    assert spec.rank == 8 and spec.alpha == 16 and set(spec.targets) == {"attn", "experts"}
    assert tensors["model.layers.0.mlp.experts.gate_up_proj.lora_A"].shape == (8, 8, 64)
    assert tensors["model.layers.0.mlp.experts.down_proj.lora_B"].shape == (8, 64, 8)


def test_the_server_serves_the_adapter_and_returns_its_tool_call(trained, base, tmp_path):
    openai = pytest.importorskip("openai")
    out, _ = trained
    model = load_model(base)
    digest = attach_adapter(model, "ft", out)
    assert digest == adapter_digest(out)
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    log = AuditLog(db, load_signing_key(cache_root() / "audit-signing.key"))
    settings = ServerSettings(model_name="base", adapters=(("ft", digest),), audit_content="full",
                              model_digest=checkpoint_digest(find_checkpoint(base)),
                              engine_mode="reproducible", model_dtype="float32",
                              kernel=arithmetic.path_name())
    client = AsyncEngine(LLMEngine(model, EngineConfig()))
    try:
        with running_server(build_app(client, settings, audit_log=log)) as url:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            assert [m.id for m in api.models.list().data] == ["base", "base:ft"]
            r = api.chat.completions.create(
                model="base:ft", messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                tools=[WEATHER], temperature=0, max_tokens=40)
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls" and r.model == "base:ft"
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
            with pytest.raises(openai.NotFoundError):
                api.chat.completions.create(model="base:nope", messages=[{"role": "user", "content": "x"}])
    finally:
        client.shutdown()
    rid = log.list()[0]["record_id"]
    start = log.get(rid)[0]
    assert start["adapter"] == "ft" and start["adapter_digest"] == digest
    # replay needs the same adapter, named by its digest
    runner = CliRunner()
    args = ["audit", "replay", rid, "--model", str(base), "--database-url", db]
    r = runner.invoke(cli, args + ["--adapter", str(out)])
    assert r.exit_code == 0 and "identical" in r.output, r.output
    r = runner.invoke(cli, args)
    assert r.exit_code == 1 and "pass it with --adapter" in r.output


def test_resume_continues_to_the_same_adapter(base, data, tmp_path):
    cfg = TrainConfig(rank=4, alpha=8, lr=5e-3, epochs=3, batch_tokens=4096, save_every=1)
    straight = finetune(base, data, tmp_path / "a", cfg)

    class Stop(Exception):
        pass

    def crash(info):
        if info.step == 2:
            raise Stop

    with pytest.raises(Stop):
        finetune(base, data, tmp_path / "b", cfg, on_step=crash)
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed = finetune(base, data, tmp_path / "b", cfg, resume=True)
    assert resumed.steps == straight.steps == 3
    a, b = load_adapter(tmp_path / "a")[1], load_adapter(tmp_path / "b")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
