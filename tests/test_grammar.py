"""Grammars that follow harmony (issue 19, first part): the analysis stays free, the answer is
JSON that matches the schema; what cannot be enforced is refused, naming the keyword."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inhouse.harmony import ConversationError, load_encoding
from inhouse.harmony.constraints import answer_grammar
from inhouse.harmony.grammar import GrammarBackend

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                           "size": {"enum": ["small", "big"]}},
          "required": ["city", "size"], "additionalProperties": False}


def ids(text: str) -> list[int]:
    return load_encoding().encode(text, allowed_special="all")


def consumes(grammar: str, text: str) -> bool:
    m = GrammarBackend().new_matcher(grammar)
    return all(m.consume(t) for t in ids(text)) and m.matcher.is_accepting()


@pytest.mark.parametrize("text, ok", [
    ('<|channel|>analysis<|message|>Think <b>free</b>ly.<|end|><|start|>assistant'
     '<|channel|>final<|message|>{"city":"Paris","size":"big"}<|return|>', True),
    ('<|channel|>final<|message|>{"city":"Paris","size":"big"}<|return|>', True),  # no analysis
    ('<|channel|>final<|message|>{"city":"Paris"}<|return|>', False),  # missing key
    ('<|channel|>final<|message|>{"city":"Paris","size":"huge"}<|return|>', False),  # not in enum
    ('<|channel|>final<|message|>Paris<|return|>', False),  # not JSON
    ('<|channel|>commentary to=functions.f<|message|>{}<|call|>', False),  # no tool calls
    ('<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>analysis<|message|>y'
     '<|end|>', False),  # the answer cannot be put off forever
])
def test_the_grammar_leaves_reasoning_free_and_constrains_the_answer(text, ok):
    assert consumes(answer_grammar(SCHEMA), text) is ok


def test_the_mask_allows_only_what_the_grammar_allows():
    m = GrammarBackend().new_matcher(answer_grammar(SCHEMA))
    for t in ids("<|channel|>final<|message|>"):
        assert m.consume(t)
    allowed = torch.from_numpy(m.allowed(100)).nonzero().flatten().tolist()
    assert allowed and all(load_encoding().decode([t]).startswith("{") for t in allowed)


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "not": {"required": ["a"]}}, "schema.not"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     "schema.properties.a.uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}, None),
    (["not", "an", "object"], None),
])
def test_what_cannot_be_enforced_is_refused_not_loosened(schema, where):
    with pytest.raises(ConversationError) as e:
        answer_grammar(schema, "response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema"
    if where:
        assert where in str(e.value)


def test_a_constrained_request_through_the_engine_follows_its_grammar(checkpoints):
    """Even the tiny random model, which writes noise, stays inside the grammar."""
    from inhouse.config import EngineConfig
    from inhouse.engine import LLMEngine, SamplingParams
    from inhouse.harmony import render_prompt, ChatMessage
    from inhouse.model import load_model

    engine = LLMEngine(load_model(checkpoints["hf"]), EngineConfig(), grammars=GrammarBackend())
    grammar = answer_grammar(SCHEMA)
    prompt = render_prompt([ChatMessage("user", "hi")])
    engine.add_request("c", prompt, SamplingParams(max_tokens=40, seed=1, grammar=grammar))
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    m = GrammarBackend().new_matcher(grammar)
    assert all(m.consume(t) for t in out)  # every sampled token was allowed
    with pytest.raises(Exception, match="grammar"):
        LLMEngine(engine.model).add_request("d", prompt, SamplingParams(grammar=grammar))
    with pytest.raises(Exception, match="cannot be compiled"):
        engine.add_request("e", prompt, SamplingParams(grammar="start: %json {"))


def test_the_engine_copies_a_checked_grammar_rather_than_compiling_it(monkeypatch):
    """A large schema takes long to compile (half a second for 400 kB): the server compiles it
    while checking the request, off the event loop; the engine's thread then only copies the
    compiled matcher, so one request's schema never stalls everyone's generation."""
    import llguidance

    from inhouse.harmony import grammar as g

    schema = {"type": "object", "required": ["k"], "properties": {"k": {"type": "integer"}}}
    text = answer_grammar(schema)  # checks it: compiled and kept
    monkeypatch.setattr(llguidance, "LLMatcher", None)  # any compilation now fails
    m = GrammarBackend().new_matcher(text)
    assert m.consume(ids("<|channel|>final<|message|>")[0])
    monkeypatch.undo()
    for i in range(g.COMPILED_KEPT + 1):  # the cache is bounded: the oldest goes first
        answer_grammar({"type": "object", "properties": {f"k{i}": {"type": "integer"}}})
    assert text not in g._compiled and len(g._compiled) == g.COMPILED_KEPT



# ---- date and time formats: what the grammar allows, every validator accepts -------------------
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_narrowed_date_and_time_formats_pass_the_strict_validators(data):
    """llguidance's RFC 3339 allows `t`, `:60` and 29 February of any year, which Python's
    jsonschema (rfc3339-validator, date.fromisoformat) refuses; the narrowed patterns do not."""
    import jsonschema

    from inhouse.harmony.formats import PATTERNS, narrow_formats

    fmt = data.draw(st.sampled_from(sorted(PATTERNS)))
    value = data.draw(st.from_regex(PATTERNS[fmt], fullmatch=True))
    jsonschema.Draft202012Validator(
        {"type": "string", "format": fmt},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(value)
    nested = narrow_formats({"type": "array", "items": {"type": "string", "format": fmt},
                             "enum": [[{"format": fmt}]]})
    assert nested["items"] == {"type": "string", "pattern": PATTERNS[fmt]}
    assert nested["enum"] == [[{"format": fmt}]]  # values are data, not schemas


@pytest.mark.parametrize("text, ok", [
    ('<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>analysis to=python code'
     '<|message|>print(1)\nprint(2)<|call|>', True),
    (' to=python<|channel|>analysis code<|message|>1+1<|call|>', True),  # recipient first
    ('<|channel|>analysis to=browser.search code<|message|>{"query":"leave"}<|call|>', True),
    (' to=browser.open<|channel|>analysis<|message|>{"id":0}<|call|>', True),
    ('<|channel|>analysis to=browser.search<|message|>not json<|call|>', False),
    ('<|channel|>analysis to=browser.delete<|message|>{}<|call|>', False),  # no such function
    ('<|channel|>analysis to=container.exec<|message|>{}<|call|>', False),  # not declared
    ('<|channel|>final<|message|>{"city":"Paris","size":"big"}<|return|>', True),
])
def test_a_constrained_turn_may_still_call_its_builtin_tools(text, ok):
    from inhouse.harmony.constraints import AnswerFormat, ToolChoice, turn_constraint

    c = turn_constraint(AnswerFormat("a", SCHEMA, "text.format"), (), ToolChoice(), "tools",
                        ("browser", "python"))
    assert consumes(c.grammar, text) is ok
    # tool_choice "none" forbids every call, built-in ones too
    none = turn_constraint(AnswerFormat("a", SCHEMA, "text.format"), (), ToolChoice("none"),
                           "tools", ("browser", "python"))
    assert not consumes(none.grammar, '<|channel|>analysis to=python<|message|>1<|call|>')
