"""Structured outputs that always parse (issue 19), tried by someone who wants them to fail.

1. The grammar and its budget closing alone, against a hostile "model" that never closes a
   string, number, array or object when it can help it: 200 generated schemas, as answers and
   as strict tool arguments; every output validates and fits its budget.
2. The demo model (which cannot write JSON by itself) through a real server, the official client,
   both APIs, streaming and not: answers validate; tool_choice required and named always yield
   a call whose arguments validate; "none" never does. The whole 200 x 4 sweep is @slow; the
   default run takes 20 schemas round the four ways.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from inhouse.harmony import load_encoding
from inhouse.harmony.constraints import AnswerFormat, ToolChoice, answer_grammar, turn_constraint
from inhouse.harmony.conversation import FunctionTool
from inhouse.harmony.grammar import NUM_IDS, GrammarBackend
from inhouse.harmony.parser import CALL
from tests.schema_gen import schemas, validator

RETURN = 200002
BUDGET = 160


@pytest.fixture(scope="module")
def closers() -> np.ndarray:
    """Tokens that could end a value: what the hostile model avoids while it has a choice."""
    enc = load_encoding()
    out = np.zeros(NUM_IDS, dtype=bool)
    for t in range(199998):
        out[t] = any(c in enc.decode([t]) for c in '"}],')
    out[199998:] = True  # harmony's specials: they end messages
    return out


def hostile_run(grammar: str, closers: np.ndarray, seed: int, budget: int = BUDGET):
    """The token ids a model that rambles wherever the grammar lets it would get out."""
    rng = np.random.default_rng(seed)
    m = GrammarBackend().new_matcher(grammar)
    out: list[int] = []
    while len(out) < budget:
        allowed = m.allowed(budget - len(out))
        ramble = np.flatnonzero(allowed & ~closers)
        ids = ramble if ramble.size and rng.random() < 0.97 else np.flatnonzero(allowed)
        token = int(rng.choice(ids))
        assert m.consume(token), "the mask allowed a token the grammar then refused"
        out.append(token)
        if token in (RETURN, CALL):
            break
    return out, m.is_cut


def final_json(ids: list[int]):
    text = load_encoding().decode(ids)
    assert text.endswith("<|return|>"), text[-200:]
    return json.loads(text.split("<|channel|>final<|message|>")[-1].removesuffix("<|return|>"))


SWEEP = schemas(200, seed=19)


def test_every_answer_validates_however_hostile_the_model(closers):
    cut = 0
    for i, s in enumerate(SWEEP):
        ids, is_cut = hostile_run(answer_grammar(s), closers, seed=i)
        validator(s).validate(final_json(ids))
        cut += is_cut
    assert cut > len(SWEEP) // 2  # the hostile model was indeed cut, and closed, most times


def test_strict_and_forced_calls_validate_however_hostile_the_model(closers):
    enc = load_encoding()
    for i, s in enumerate(SWEEP[:60]):
        tools = (FunctionTool("lookup", "", s, strict=True),
                 FunctionTool("other", "", {"type": "object"}))
        choice = ToolChoice("required") if i % 2 else ToolChoice(name="lookup")
        grammar = turn_constraint(None, tools, choice).grammar
        ids, _ = hostile_run(grammar, closers, seed=i)
        text = enc.decode(ids)
        assert ids[-1] == CALL, text[-200:]
        header, args = text.split("<|message|>")[-2:]
        name = "lookup" if "functions.lookup" in header else "other"
        assert name == "lookup" or choice.mode == "required", header
        if name == "lookup":
            validator(s).validate(json.loads(args.removesuffix("<|call|>")))
        else:
            assert isinstance(json.loads(args.removesuffix("<|call|>")), dict)


def test_none_makes_a_call_unwritable(closers):
    tools = (FunctionTool("lookup", "", {"type": "object"}),)
    grammar = turn_constraint(None, tools, ToolChoice("none")).grammar
    for seed in range(20):
        ids, _ = hostile_run(grammar, closers, seed=seed, budget=60)
        assert CALL not in ids and "functions." not in load_encoding().decode(ids)


@pytest.mark.parametrize("args, param, needle", [
    ((AnswerFormat("a", {"type": "object", "not": {}}, "text.format.schema"), (),
      ToolChoice()), "text.format.schema", "schema.not"),
    ((None, (FunctionTool("f", "", {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}, strict=True),), ToolChoice()),
     "tools[0].parameters", "uniqueItems"),
    ((None, (FunctionTool("f", "", {"type": "object", "properties": {
        "x": {"type": "string", "format": "hostname-ish"}}}, strict=True),), ToolChoice()),
     "tools", "Unknown format"),
    ((None, (), ToolChoice("required")), "tool_choice", "no tools"),
    ((None, (FunctionTool("f"),), ToolChoice(name="g")), "tool_choice", "'g'"),
])
def test_what_cannot_be_enforced_is_refused_by_name(args, param, needle):
    from inhouse.harmony import ConversationError

    with pytest.raises(ConversationError) as e:
        turn_constraint(*args)
    assert e.value.param == param and needle in str(e.value)


def test_a_loose_function_stays_free_and_a_strict_one_is_held():
    loose = (FunctionTool("f", "", {"type": "object", "not": {}}),)  # not enforced: not refused
    assert turn_constraint(None, loose, ToolChoice()).grammar is None
    strict = (FunctionTool("f", "", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"]}, strict=True),)
    grammar = turn_constraint(None, strict, ToolChoice()).grammar
    m = GrammarBackend().new_matcher(grammar)
    bad = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a":"x"}'
    assert not all(m.consume(t) for t in load_encoding().encode(bad, allowed_special="all"))


# ---- the demo model through the server -------------------------------------------------------
@pytest.fixture(scope="module")
def demo_url(demo_cache):
    from inhouse.config import EngineConfig, ServerSettings
    from inhouse.convert.demo import trained_demo_path
    from inhouse.engine import AsyncEngine, LLMEngine
    from inhouse.model import load_model
    from inhouse.server import build_app
    from tests.server_utils import running_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INHOUSE_CACHE", str(demo_cache))
        path = trained_demo_path()
    # batched: this test is about the answers' shape, not replay; it runs 16 at a time
    engine = AsyncEngine(LLMEngine(load_model(path), EngineConfig(mode="batched"),
                                   grammars=GrammarBackend()))
    settings = ServerSettings(model_name="inhouse-demo", is_demo=True, audit=False)
    try:
        with running_server(build_app(engine, settings)) as url:
            yield url
    finally:
        engine.shutdown()


def api(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


QUESTION = "What is the capital of France?"


def answer(url: str, schema: dict, way: int, seed: int) -> str:
    """One answer, one of four ways: chat or Responses, streaming or not."""
    c = api(url)
    if way < 2:
        kw = dict(model="inhouse-demo", max_tokens=BUDGET, seed=seed,
                  messages=[{"role": "user", "content": QUESTION}],
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "answer", "schema": schema, "strict": True}})
        if way == 1:
            return "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(stream=True, **kw) if ch.choices)
        return c.chat.completions.create(**kw).choices[0].message.content
    kw = dict(model="inhouse-demo", max_output_tokens=BUDGET, input=QUESTION,
              extra_body={"seed": seed},
              text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                               "strict": True}})
    if way == 3:
        events = list(c.responses.create(stream=True, **kw))
        return "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return c.responses.create(**kw).output_text


def sweep(url: str, cases: list[tuple[int, dict, int]]) -> None:
    def one(case):
        i, schema, way = case
        text = answer(url, schema, way, seed=i)
        try:
            validator(schema).validate(json.loads(text))
        except Exception as e:  # noqa: BLE001 - reported with the case, all at once
            return f"schema {i} way {way}: {type(e).__name__}: {str(e)[:120]} in {text[-120:]!r}"
        return None

    with ThreadPoolExecutor(16) as pool:
        failures = [f for f in pool.map(one, cases) if f]
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)


def test_the_demo_answers_validate_both_apis_streaming_or_not(demo_url):
    sweep(demo_url, [(i, s, i % 4) for i, s in enumerate(SWEEP[:20])])


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("way", range(4), ids=["chat", "chat-stream", "responses",
                                               "responses-stream"])
def test_the_demo_answers_validate_over_200_schemas(demo_url, way):
    sweep(demo_url, [(i, s, way) for i, s in enumerate(SWEEP)])


def test_the_demo_is_made_to_call_and_its_arguments_validate(demo_url):
    def one(i: int) -> None:
        c, s = api(demo_url), SWEEP[i]
        tool = {"type": "function", "function": {"name": "lookup", "description": "Look up.",
                                                 "parameters": s, "strict": True}}
        other = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}
        choice = "required" if i % 2 else {"type": "function", "function": {"name": "lookup"}}
        r = c.chat.completions.create(model="inhouse-demo", max_tokens=BUDGET, seed=i,
                                      messages=[{"role": "user", "content": QUESTION}],
                                      tools=[tool, other], tool_choice=choice)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason in ("tool_calls", "length") and not \
            r.choices[0].message.content
        if call.function.name == "lookup":
            validator(s).validate(json.loads(call.function.arguments))
        else:
            assert choice == "required" and isinstance(json.loads(call.function.arguments), dict)
        resp = c.responses.create(model="inhouse-demo", max_output_tokens=BUDGET, input=QUESTION,
                                  extra_body={"seed": i}, tool_choice={"type": "function",
                                                                       "name": "lookup"},
                                  tools=[{"type": "function", "name": "lookup",
                                          "parameters": s, "strict": True}])
        (fc,) = [o for o in resp.output if o.type == "function_call"]
        assert fc.name == "lookup"
        validator(s).validate(json.loads(fc.arguments))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))


def test_the_demo_asked_for_the_weather_with_tool_choice_none_answers_in_text(demo_url):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for seed in range(3):
        r = api(demo_url).chat.completions.create(
            model="inhouse-demo", max_tokens=BUDGET, seed=seed, tool_choice="none", tools=[weather],
            messages=[{"role": "user", "content": "What is the weather in Toronto?"}])
        m = r.choices[0].message
        assert not m.tool_calls and "functions." not in (m.content or "")


def test_constrained_logprobs_are_finite_and_json(demo_url):
    r = api(demo_url).chat.completions.create(
        model="inhouse-demo", max_tokens=BUDGET, seed=1, logprobs=True, top_logprobs=5,
        messages=[{"role": "user", "content": QUESTION}],
        response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    lps = r.choices[0].logprobs.content
    assert lps and all(np.isfinite(t.logprob) and t.top_logprobs for t in lps)
