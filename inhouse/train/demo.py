"""The embedded demo model: a small gpt-oss-architecture model (the `demo` preset, real o200k
vocabulary) trained from seeded random weights on synthetic harmony conversations, so that
`make run` serves something that answers in valid harmony with no download.

What it learns (and all it knows): an analysis message then a final message for a handful of
facts, greetings, a sentence quoted back word for word, and a fallback that says what it is; a function call with valid JSON arguments
when a weather or time tool is offered and asked for; a short final answer after the tool result;
and (demo_tools.py) the browser for one question a sample document, python for a few sums and
the sample policy's verdict.
System prompts vary (date, reasoning effort, developer instructions) as the server renders them.
It is a demo of the pipeline, labelled as such everywhere it is served.

Training: every weight (experts dense in fp32 while training), AdamW, cosine schedule, loss on
the assistant tokens only (harmony/training.py). Then the experts are quantised to MXFP4 and the
checkpoint is written in the HF layout, like the real models.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from inhouse.config import preset
from inhouse.convert.demo import DEMO_VERSION
from inhouse.convert.quantize import quantize_mxfp4
from inhouse.convert.random_init import random_tensors
from inhouse.convert.writer import write_checkpoint
from inhouse.harmony.conversation import ChatMessage, FunctionTool, PromptOptions, ToolCall
from inhouse.harmony.training import TrainingSequence, render_for_training
from inhouse.model.lora import EXPERT_PROJS
from inhouse.model.mxfp4 import dequantize
from inhouse.model.transformer import Transformer
from inhouse.train.demo_tools import (browser_conversation, policy_conversation,
                                      python_conversation)

FACTS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
         "Canada": "Ottawa", "Germany": "Berlin", "Egypt": "Cairo", "Brazil": "Brasilia",
         "Kenya": "Nairobi", "Norway": "Oslo", "Peru": "Lima", "India": "New Delhi"}
CITIES = ["Paris", "London", "Tokyo", "Toronto", "Berlin", "Madrid", "Oslo", "Lima", "Cairo",
          "Sydney", "Montreal", "Vancouver", "Rome", "Nairobi", "Seoul", "Dublin"]
WEATHER = FunctionTool("get_weather", "Get the current weather for a city.",
                       {"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]})
TIME = FunctionTool("get_time", "Get the current local time in a city.",
                    {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]})
INSTRUCTIONS = ["", "", "Be concise.", "Answer in one sentence.", "You are a helpful assistant."]
# what it quotes back (speculative decoding's prompt lookup drafts such answers from the prompt)
QUOTES = ["The meeting in {city} starts at {n} o'clock.", "Please send the report on {country} "
          "by Friday.", "Our office in {city} is closed on {day}.", "Invoice {n} was paid in "
          "{city}.", "Room {n} is booked for the team from {country}.",
          "The tenant shall keep the premises in {city} in good repair.",
          "Flight {n} to {city} leaves from gate {n2}."]
ASK_QUOTE = ["Repeat after me: {}", "Quote this exactly: {}", "Say this back to me: {}"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
IDENTITY = ("I am the inhouse demo model, a tiny model trained only to show the pipeline. "
            "Ask me for the capital of a country, or for the weather with a tool.")


def _conversation(rng: random.Random) -> tuple[list[ChatMessage], PromptOptions]:
    # NOTE: browser conversations are rare (0.8): one is ~770 tokens (its declaration alone
    # ~380), as many as four others, and the three questions it learns by heart need no more
    kind = rng.choices(["fact", "greet", "unknown", "weather", "time", "weather_done", "quote",
                        "python", "policy", "browser"],
                       [2, 1, 1, 2, 1, 1, 1, 1, 1.4, 0.8])[0]
    tools: tuple[FunctionTool, ...] = ()
    builtin: tuple[str, ...] = ()
    msgs = []
    if kind == "policy":  # the guard's conversation, exactly as the server builds it
        return policy_conversation(rng)
    instructions = rng.choice(INSTRUCTIONS)
    if instructions:
        msgs.append(ChatMessage("system", instructions))
    if kind == "fact":
        country = rng.choice(list(FACTS))
        q = rng.choice(["What is the capital of {}?", "Capital of {}?",
                        "Which city is the capital of {}?", "Tell me the capital of {}."])
        msgs += [ChatMessage("user", q.format(country)),
                 ChatMessage("assistant", f"The capital of {country} is {FACTS[country]}.",
                             reasoning=f"The user asks for the capital of {country}. "
                                       f"It is {FACTS[country]}.")]
        if rng.random() < 0.3:
            tools = (rng.choice([WEATHER, TIME]),)  # a tool on offer but not needed
    elif kind == "python":
        msgs += python_conversation(rng)
        builtin = ("python",)
    elif kind == "browser":
        msgs += browser_conversation(rng)
        builtin = ("browser",)
    elif kind == "greet":
        msgs += [ChatMessage("user", rng.choice(["Hello", "Hi!", "Hey there", "Good morning"])),
                 ChatMessage("assistant", "Hello! How can I help you today?",
                             reasoning="The user greets me. I greet back.")]
    elif kind == "quote":
        text = rng.choice(QUOTES).format(city=rng.choice(CITIES), country=rng.choice(list(FACTS)),
                                         day=rng.choice(DAYS), n=rng.randint(2, 99),
                                         n2=rng.randint(1, 40))
        msgs += [ChatMessage("user", rng.choice(ASK_QUOTE).format(text)),
                 ChatMessage("assistant", text,
                             reasoning="The user wants the text repeated word for word.")]
    elif kind == "unknown":
        q = rng.choice(["Who are you?", "What can you do?", "Write a poem.", "Explain quantum physics.",
                        "What is 17 times 23?", "Summarise this text for me."])
        msgs += [ChatMessage("user", q),
                 ChatMessage("assistant", IDENTITY,
                             reasoning="I am a small demo model and cannot do this. I say what I am.")]
    else:
        city = rng.choice(CITIES)
        tool = TIME if kind == "time" else WEATHER
        tools = (tool, WEATHER if tool is TIME else TIME) if rng.random() < 0.3 else (tool,)
        q = (rng.choice(["What time is it in {}?", "Current time in {}?"]) if tool is TIME else
             rng.choice(["What is the weather in {}?", "Weather in {}?", "How is the weather in {}?"]))
        call = ToolCall(tool.name, json.dumps({"city": city}), "call_1")
        reasoning = f"The user asks about {city}. I call {tool.name}."
        msgs += [ChatMessage("user", q.format(city)),
                 ChatMessage("assistant", reasoning=reasoning, tool_calls=(call,))]
        if kind == "weather_done":
            result = json.dumps({"city": city, "temperature_c": rng.randint(-10, 35),
                                 "sky": rng.choice(["sunny", "cloudy", "rain"])})
            msgs += [ChatMessage("tool", result, tool_call_id="call_1"),
                     ChatMessage("assistant", "Here is the current weather from the tool.",
                                 reasoning="The tool answered. I report it.")]
    if kind in ("fact", "unknown") and rng.random() < 0.1 and " times " not in msgs[-2].content:
        builtin = ("python",)  # on offer but not needed (arithmetic is what it is for, and
        # a sum asked with python on offer is always computed: never "I cannot")
    if kind != "policy" and rng.random() < 0.3:  # a chat's later turn: an earlier one before it
        at = 1 if instructions else 0
        msgs[at:at] = _earlier_turn(rng)
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    effort = rng.choice(["low", "medium", "high"])
    return msgs, PromptOptions(effort, date, tools=tools, builtin_tools=builtin)


def _earlier_turn(rng: random.Random) -> list[ChatMessage]:
    """A question already answered (its analysis is dropped from the prompt, as at inference):
    the web UI and `inhouse chat` send whole conversations."""
    if rng.random() < 0.7:
        country = rng.choice(list(FACTS))
        return [ChatMessage("user", f"What is the capital of {country}?"),
                ChatMessage("assistant", f"The capital of {country} is {FACTS[country]}.",
                            reasoning=f"The user asks for the capital of {country}. "
                                      f"It is {FACTS[country]}.")]
    return [ChatMessage("user", rng.choice(["Hello", "Hi!"])),
            ChatMessage("assistant", "Hello! How can I help you today?",
                        reasoning="The user greets me. I greet back.")]


def training_sequences(n: int, seed: int) -> list[TrainingSequence]:
    rng = random.Random(seed)
    out: list[TrainingSequence] = []
    while len(out) < n:
        msgs, options = _conversation(rng)
        out.extend(render_for_training(msgs, options))
    return out[:n]


def _random_dense_model(seed: int) -> Transformer:
    """The demo shape with seeded random weights, experts dense fp32 (trainable)."""
    cfg = preset("demo")
    tensors = dict(random_tensors(cfg, seed))
    state = {}
    for name, t in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            state[base] = dequantize(t, tensors[base + "_scales"]).transpose(1, 2).contiguous()
        else:
            state[name] = t.float()
    model = Transformer(cfg, "dense", torch.float32)
    model.load_state_dict(state, strict=True)
    return model


def train_demo(steps: int = 450, seed: int = 0, batch: int = 16, lr: float = 3e-3,
               on_step: Callable[[int, int, float], None] | None = None) -> Transformer:
    """Train the demo model. Only the tokens the synthetic data uses (a few thousand) get
    embedding and unembedding rows; the unembedding rows of all others are fixed at zero, so
    their logits are exactly 0 and the loss below (the used rows plus one column of
    log(#unused) for all the others at once) is the full-vocabulary cross-entropy of the model
    that is written out, at a fraction of the cost."""
    torch.manual_seed(seed)
    model = _random_dense_model(seed)
    seqs = training_sequences(steps * batch // 4, seed)
    V = model.config.vocab_size
    used = torch.tensor(sorted({t for s in seqs for t in s.ids}))
    remap = torch.full((V,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    full_embed, full_head = model.model.embed_tokens, model.lm_head
    model.model.embed_tokens = nn.Embedding.from_pretrained(full_embed.weight.data[used].clone(),
                                                            freeze=False)
    model.lm_head = nn.Linear(model.config.hidden_size, len(used), bias=False)
    model.lm_head.weight.data.copy_(full_head.weight.data[used])
    rest = math.log(V - len(used))  # logsumexp of the zero logits of all unused tokens
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = random.Random(seed + 1)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        chosen = rng.sample(seqs, batch)
        num_targets = sum(s.num_targets for s in chosen)
        # all sequences of the batch in one forward, each attending only to itself
        inputs, rows, labels, offset = [], [], [], 0
        for seq in chosen:
            ids = remap[torch.tensor(seq.ids)]
            targets = torch.tensor([t for t in range(1, len(seq.ids)) if seq.mask[t]])
            inputs.append(ids[:-1])
            rows.append(offset + targets - 1)  # row t-1 predicts token t
            labels.append(ids[targets])
            offset += len(seq.ids) - 1
        h = model.hidden_states(torch.cat(inputs), [len(x) for x in inputs])  # (N, H)
        logits = model.lm_head(h[torch.cat(rows)])  # (n, used)
        logits = torch.cat([logits, torch.full((logits.shape[0], 1), rest)], dim=1)
        loss = nn.functional.cross_entropy(logits, torch.cat(labels), reduction="sum")
        (loss / num_targets).backward()
        total = loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step:
            on_step(step, steps, total / num_targets)
    with torch.no_grad():  # back to the full vocabulary: unused unembedding rows are zero
        full_embed.weight[used] = model.model.embed_tokens.weight
        full_head.weight.zero_()
        full_head.weight[used] = model.lm_head.weight
    model.model.embed_tokens, model.lm_head = full_embed, full_head
    model.eval()
    return model


def model_tensors(model: Transformer):
    """(HF name, tensor) of the trained model, experts quantised to MXFP4, floats bf16."""
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.split(".")[-1] in EXPERT_PROJS:  # dense [E, in, out] -> MXFP4 [E, out, ...]
            blocks, scales = quantize_mxfp4(t.transpose(1, 2))
            yield name + "_blocks", blocks
            yield name + "_scales", scales
        else:
            yield name, t.to(torch.bfloat16)


def build_demo(path: str | Path, steps: int = 450, seed: int = 0,
               on_step: Callable[[int, int, float], None] | None = None) -> Path:
    """Train and write the demo checkpoint into `path` (HF layout, MXFP4 experts)."""
    t0 = time.perf_counter()
    model = train_demo(steps, seed, on_step=on_step)
    root = write_checkpoint(path, preset("demo"), model_tensors(model), "hf")
    info = {"inhouse_demo": DEMO_VERSION, "seed": seed, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "label": "demo model: tiny, trained on synthetic conversations; knows only a few facts"}
    (root / "inhouse_demo.json").write_text(json.dumps(info, indent=2) + "\n")
    return root
