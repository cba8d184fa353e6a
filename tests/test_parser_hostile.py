"""The output parser against hostile token sequences (issue 17, finding 4): whatever ids the model
emits, `feed` and `finish` never raise, and no harmony control token's text reaches the answer,
the reasoning or a tool call's arguments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from inhouse.harmony import (ContentDelta, MessageDone, OutputParser, ReasoningDelta,
                             ToolCallDelta, ToolCallDone, load_encoding, parse_completion)

SPECIALS = (199998, 199999, 200000, 200001, 200002, 200003, 200004, 200005, 200006, 200007,
            200008, 200009, 200012, 200018, 201087, 201088)
HEADER_WORDS = "assistant analysis final commentary to=functions.get_weather json"


def _ordinary() -> list[int]:
    enc = load_encoding()
    ids = enc.encode(HEADER_WORDS + ' {"city": "Paris"} hello world 9 ## ramble é 漢字',
                     allowed_special=set())
    return sorted({t for t in ids if "<|" not in enc.decode([t])})


ORDINARY = _ordinary()
# text the parser may give out: never a control token's text
CONTROL_TEXTS = [load_encoding().decode([t]) for t in SPECIALS]


def tokens(text: str) -> list[int]:
    return load_encoding().encode(text, allowed_special="all")


def _texts(events) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, (ContentDelta, ReasoningDelta)):
            out.append(e.text)
        elif isinstance(e, (ToolCallDelta, ToolCallDone)):
            out.append(e.arguments)
            out.append(e.name or "")
    return out


def _run(ids: list[int]) -> list:
    p = OutputParser()
    events = []
    for t in ids:
        events += p.feed(t)
    return events + p.finish()


mixture = st.lists(st.one_of(st.sampled_from(SPECIALS), st.sampled_from(ORDINARY)), max_size=120)
# well-formed pieces shuffled with stray specials: closer to what a hot sampler writes
pieces = st.lists(st.one_of(
    st.sampled_from(SPECIALS).map(lambda t: [t]),
    st.sampled_from(["<|channel|>analysis<|message|>think", "<|channel|>final<|message|>Hi",
                     "<|start|>assistant", "<|end|>", "<|return|>", "<|call|>",
                     "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
                     '{"city": "Paris"}', " hello"]).map(tokens)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(mixture)
def test_random_mixtures_never_raise_nor_leak_control_text(ids):
    for text in _texts(_run(ids)):
        assert not any(c in text for c in CONTROL_TEXTS), text


@settings(max_examples=300, deadline=None)
@given(pieces)
def test_shuffled_harmony_pieces_never_raise_nor_leak_control_text(chunks):
    ids = [t for c in chunks for t in c]
    for text in _texts(_run(ids)):
        assert not any(c in text for c in CONTROL_TEXTS), text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-3, max_value=260_000), max_size=60))
def test_any_integer_never_raises(ids):
    _run(ids)


def test_long_header_with_a_start_among_pending_tokens():
    # the crash the hostile user found: text mode entered with <|start|> among the header's ids
    ids = [200006] + ORDINARY[:10] * 6 + tokens("<|start|>assistant<|channel|>final<|message|>ok")
    out = parse_completion(ids)
    assert "ok" in out.content
    assert "<|" not in out.content


def test_stray_start_ends_the_message_and_begins_the_next():
    out = parse_completion(tokens("<|channel|>analysis<|message|>thinking<|start|>assistant"
                                  "<|channel|>final<|message|>Paris.<|return|>"))
    assert out.reasoning == "thinking"
    assert out.content == "Paris."


@pytest.mark.parametrize("stray", ["<|channel|>", "<|message|>", "<|constrain|>",
                                   "<|reserved_200013|>", "<|endoftext|>"])
def test_stray_special_in_content_is_dropped(stray):
    out = parse_completion(tokens(f"<|channel|>final<|message|>Par{stray}is.<|return|>"))
    assert out.content == "Paris."
    assert out.warnings


def test_end_token_inside_a_header_shows_it_as_text_and_goes_on():
    events = _run(tokens("<|channel|>fin<|end|><|start|>assistant<|channel|>final<|message|>"
                         "ok<|return|>"))
    assert "".join(_texts(events)) == "finok"
    assert sum(isinstance(e, MessageDone) for e in events) == 2


def test_tool_call_after_stray_tokens_is_still_a_call():
    out = parse_completion(tokens("<|channel|>analysis<|message|>x<|message|>y<|end|>"
                                  "<|start|>assistant<|channel|>commentary to=functions.get_weather"
                                  ' <|constrain|>json<|message|>{"city": "Paris"}<|call|>'))
    assert out.reasoning == "xy"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Paris"}')]
