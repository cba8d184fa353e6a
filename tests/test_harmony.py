import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings, strategies as st

from inhouse.harmony import (ChatMessage, ContentDelta, ConversationError, FunctionTool,
                             OutputParser, PromptOptions, ReasoningDelta, ToolCall, ToolCallDelta,
                             ToolCallDone, decode, encode_text, load_encoding, parse_completion,
                             render_prompt, stop_token_ids)
from inhouse.harmony.vocab import VOCAB_SHA256, ensure_vocab

WEATHER = FunctionTool("get_weather", "Current weather in a city.",
                       {"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]})


def special(text: str) -> list[int]:
    return load_encoding().encode(text, allowed_special="all")


def test_vocab_is_the_official_file():
    import hashlib
    d = ensure_vocab()
    assert hashlib.sha256((d / "o200k_base.tiktoken").read_bytes()).hexdigest() == VOCAB_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(d)


def test_stop_tokens_are_return_and_call_never_end():
    assert sorted(stop_token_ids()) == [200002, 200012]


def _run_isolated(code: str, tmp_path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIKTOKEN")}
    env["INHOUSE_CACHE"] = str(tmp_path / "cache")  # nothing prepared: a fresh machine
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_render_and_parse_with_the_network_made_impossible(tmp_path):
    proc = _run_isolated("""
        import socket
        def refuse(*a, **k):
            raise OSError("network disabled by the test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from inhouse.harmony import ChatMessage, render_prompt, parse_completion, load_encoding
        ids = render_prompt([ChatMessage("user", "Hello")])
        enc = load_encoding()
        out = parse_completion(enc.encode("<|channel|>final<|message|>Hi!<|return|>", allowed_special="all"))
        print(len(ids), out.content)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1] == "Hi!"


def test_missing_vocabulary_says_what_to_install(tmp_path):
    proc = _run_isolated("""
        import sys
        import importlib.util
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "bpe_openai" else _find(name, *a)
        from inhouse.harmony import load_encoding
        from inhouse.errors import HarmonyUnavailable
        try:
            load_encoding()
        except HarmonyUnavailable as e:
            print("ERROR:", e)
    """, tmp_path)
    assert "ERROR:" in proc.stdout and "pip install bpe-openai" in proc.stdout, proc.stdout + proc.stderr


def test_system_message_carries_effort_date_cutoff_and_tool_routing():
    text = decode(render_prompt([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")],
                                PromptOptions("high", "2026-11-22", tools=(WEATHER,))))
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    for line in ("Knowledge cutoff: 2024-06", "Current date: 2026-11-22", "Reasoning: high",
                 "# Valid channels: analysis, commentary, final.",
                 "Calls to these tools must go to the commentary channel: 'functions'."):
        assert line in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief." in text
    assert "type get_weather = (_: {\ncity: string,\n}) => any;" in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


TOOL_LOOP = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", reasoning="Need the weather tool.",
                tool_calls=(ToolCall("get_weather", '{"city":"Paris"}', "call_1"),)),
    ChatMessage("tool", '{"temp": 20}', tool_call_id="call_1"),
]


def test_tool_loop_keeps_reasoning_and_renders_call_and_result():
    text = decode(render_prompt(TOOL_LOOP, PromptOptions(tools=(WEATHER,))))
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the weather tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city":"Paris"}<|call|>'
            '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
            "<|start|>assistant") in text


def test_reasoning_of_a_finished_turn_is_dropped():
    convo = TOOL_LOOP + [ChatMessage("assistant", "It is 20C.", reasoning="Answer now."),
                         ChatMessage("user", "Thanks")]
    text = decode(render_prompt(convo, PromptOptions(tools=(WEATHER,))))
    assert "Need the weather tool." not in text and "Answer now." not in text
    assert "<|start|>assistant<|channel|>final<|message|>It is 20C.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Thanks<|end|><|start|>assistant")


@pytest.mark.parametrize("messages, needle", [
    ([ChatMessage("tool", "{}", name=None)], "tool result without a preceding tool call"),
    ([ChatMessage("robot", "x")], "unknown role 'robot'"),
    ([ChatMessage("assistant", "")], "assistant message is empty"),
])
def test_bad_conversations(messages, needle):
    with pytest.raises(ConversationError, match=needle):
        render_prompt(messages)


def test_bad_effort():
    with pytest.raises(ConversationError, match="reasoning effort"):
        PromptOptions(reasoning_effort="extreme")


def test_round_trip_every_assistant_message_kind():
    completion = special(
        "<|channel|>analysis<|message|>Let me think: café ☕.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Zürich"}<|call|>')
    out = parse_completion(completion)
    assert out.reasoning == "Let me think: café ☕."
    assert [(c.name, json.loads(c.arguments), c.arguments_valid) for c in out.tool_calls] == \
        [("get_weather", {"city": "Zürich"}, True)]
    final = parse_completion(special("<|channel|>analysis<|message|>ok<|end|><|start|>assistant"
                                     "<|channel|>final<|message|>Bonjour, 世界!<|return|>"))
    assert (final.reasoning, final.content, final.warnings) == ("ok", "Bonjour, 世界!", [])


def test_streaming_events_arrive_incrementally():
    p = OutputParser()
    events = []
    for t in special('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": [1, 2]}<|call|>'):
        events.append(p.feed(t))
    deltas = [e for evs in events for e in evs if isinstance(e, ToolCallDelta)]
    assert len(deltas) > 2 and deltas[0].name == "f" and all(d.name is None for d in deltas[1:])
    done = [e for evs in events for e in evs if isinstance(e, ToolCallDone)]
    assert done == [ToolCallDone(0, "f", '{"a": [1, 2]}', True)]


def test_invalid_tool_json_is_flagged_not_raised():
    out = parse_completion(special("<|channel|>commentary to=functions.f<|message|>{oops<|call|>"))
    assert out.tool_calls[0].arguments == "{oops" and not out.tool_calls[0].arguments_valid


@pytest.mark.parametrize("text, visible", [
    ("hello<|end|>", "hello"),  # no header at all
    ("<|channel|>weird<|message|>hi<|end|>", "hi"),  # unknown channel
    ("<|channel|>final<|message|>cut o", "cut o"),  # truncated by max_tokens
    ("<|channel|>final<|start|>x", "finalx"),  # stray special token in the header
])
def test_malformed_output_degrades_to_text_with_a_warning(text, visible):
    out = parse_completion(special(text))
    assert out.content == visible and out.warnings


def test_headerless_output_streams_as_text_before_the_end():
    enc = load_encoding()
    ids = enc.encode("word " * 80 + "café ☕ done")
    p, seen_before_finish = OutputParser(), []
    for t in ids:
        seen_before_finish += p.feed(t)
    streamed = "".join(e.text for e in seen_before_finish if isinstance(e, ContentDelta))
    assert len(streamed) > 100  # it streamed, not only at finish()
    tail = "".join(e.text for e in p.finish() if isinstance(e, ContentDelta))
    assert streamed + tail == "word " * 80 + "café ☕ done"
    # and the format is picked up again at the next <|start|>
    p = OutputParser()
    events = [e for t in ids + special("<|start|>assistant<|channel|>final<|message|>OK<|return|>")
              for e in p.feed(t)]
    assert [e.text for e in events if isinstance(e, ContentDelta)][-1] == "OK"


SPECIALS = [199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012, 200018]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIALS), st.integers(0, 199_997)), max_size=40))
def test_parser_never_raises_on_random_tokens(tokens):
    parse_completion(tokens)


def test_text_encoding_keeps_special_look_alikes_as_text():
    ids = encode_text("<|end|> is text here")
    assert 200007 not in ids and decode(ids) == "<|end|> is text here"


def test_builtin_calls_are_events_only_when_declared():
    from inhouse.harmony import BuiltinCallDelta, BuiltinCallDone, OutputParser, ParseWarning

    text = ("<|channel|>analysis to=python code<|message|>print(1)<|call|>")
    ids = load_encoding().encode(text, allowed_special="all")
    declared = OutputParser(("python",))
    events = [e for t in ids for e in declared.feed(t)] + declared.finish()
    assert [e for e in events if isinstance(e, BuiltinCallDone)] == [
        BuiltinCallDone(0, "python", "print(1)")]
    assert "".join(e.text for e in events if isinstance(e, BuiltinCallDelta)) == "print(1)"
    # not declared (or a look-alike recipient): shown as text, with a warning
    for parser, source in ((OutputParser(), text),
                           (OutputParser(("python",)), text.replace("to=python", "to=python.run"))):
        ids = load_encoding().encode(source, allowed_special="all")
        events = [e for t in ids for e in parser.feed(t)] + parser.finish()
        assert not any(isinstance(e, (BuiltinCallDelta, BuiltinCallDone)) for e in events)
        assert any(isinstance(e, ParseWarning) for e in events)
