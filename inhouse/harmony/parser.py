"""Generated tokens -> typed events, incrementally, never raising.

Wraps openai-harmony's StreamableParser. Whatever the model emits (a wrong header, an unknown
channel, stray special tokens, a message cut off by max_tokens), `feed` and `finish` return events
and record a warning instead of raising: malformed output degrades to visible text.

NOTE: harmony's non-strict mode keeps the text of a special token it did not expect (a
`<|start|>` inside a message, a `<|channel|>` in its content) as message text. So special tokens
are gated here before harmony sees them: a stray `<|start|>` ends the message in progress and
begins the next (as after `<|end|>`), every other special token out of place is dropped with a
warning, and a header cut short shows its ordinary tokens as text. Only ordinary tokens ever
become text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from inhouse.harmony.vocab import load_encoding

CHANNELS = ("analysis", "commentary", "final")
# Real headers are short ("<|channel|>commentary to=functions.NAME <|constrain|>json" is ~15
# tokens); a "header" longer than this is output that lost the format: stream it as text.
MAX_HEADER_TOKENS = 48
START, END, MESSAGE, CHANNEL, RETURN, CALL = 200006, 200007, 200008, 200005, 200002, 200012
CONSTRAIN = 200003
NUM_IDS = 201089  # o200k_harmony decodes ids 0..201088 (the checkpoints' vocab is 201088)
ENDS = (END, RETURN, CALL)
HEADER_SPECIALS = (CHANNEL, CONSTRAIN, MESSAGE)  # the specials a header may hold


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of a tool call's JSON arguments; `name` is set on a call's first delta."""
    index: int
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ToolCallDone:
    index: int
    name: str
    arguments: str
    arguments_valid: bool  # do the arguments parse as JSON?


@dataclass(frozen=True)
class BuiltinCallDelta:
    """Part of a call to a built-in tool (`python`'s code, `browser.*`'s JSON arguments)."""
    index: int
    recipient: str  # "python", "browser.search", "browser.open", "browser.find"
    text: str


@dataclass(frozen=True)
class BuiltinCallDone:
    index: int
    recipient: str
    text: str


@dataclass(frozen=True)
class MessageDone:
    channel: str | None
    recipient: str | None


@dataclass(frozen=True)
class ParseWarning:
    message: str


Event = (ReasoningDelta | ContentDelta | ToolCallDelta | ToolCallDone | BuiltinCallDelta
         | BuiltinCallDone | MessageDone | ParseWarning)


@dataclass
class ParsedOutput:
    """Everything one completion said, gathered from its events."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDone] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, ReasoningDelta):
                self.reasoning += e.text
            elif isinstance(e, ContentDelta):
                self.content += e.text
            elif isinstance(e, ToolCallDone):
                self.tool_calls.append(e)
            elif isinstance(e, ParseWarning):
                self.warnings.append(e.message)


class OutputParser:
    """Feed it the completion's tokens (the prompt ended with `<|start|>assistant`).
    `builtin`: the built-in tools the turn declared (their calls become `BuiltinCall*` events;
    a call to an undeclared one is shown as text, with a warning)."""

    def __init__(self, builtin: tuple[str, ...] = ()) -> None:
        self._enc = load_encoding()
        self._builtin = builtin
        self._num_calls = 0
        self._num_builtin = 0
        self.reasoning_tokens = 0  # tokens of analysis messages (headers and ends included)
        self._new_parser(expect_role=True)

    def _new_parser(self, expect_role: bool) -> None:
        from openai_harmony import Role, StreamableParser

        self._parser = StreamableParser(self._enc, Role.ASSISTANT if expect_role else None,
                                        strict=False)
        self._pending: list[int] = []  # tokens of the message in progress
        self._text_tokens: list[int] | None = None  # text mode: ids shown as plain text
        self._text_shown = 0  # characters of the text-mode decode already emitted
        self._emitted = ""  # the text this message has emitted so far
        self._call_index: int | None = None
        self._builtin_index: int | None = None
        self._channel_checked = False

    def feed(self, token: int) -> list[Event]:
        if self._text_tokens is not None:
            return self._feed_text(token)
        if not self._is_valid(token):
            return [ParseWarning(f"token id {token} is outside the vocabulary; dropped")]
        if self._enc.is_special_token(token):
            return self._feed_special(token)
        return self._feed_harmony(token)

    def _is_valid(self, token: int) -> bool:
        return isinstance(token, int) and 0 <= token < NUM_IDS

    def _feed_special(self, token: int) -> list[Event]:
        """Hand harmony a special token only where the format has one (see the module note)."""
        state = self._parser.state.value
        if token == START:
            if state == "ExpectStart":
                return self._feed_harmony(token)
            if state == "Content":  # a stray start: close the message as <|end|> would
                events = self._feed_harmony(END)
                events.append(ParseWarning("<|start|> inside a message; ended it there"))
            else:
                events = self._salvage("<|start|> inside a message header")
            return events + self._feed_harmony(token)
        if token in ENDS:
            if state == "Content":
                return self._feed_harmony(token)
            if state == "Header":
                return self._salvage(f"{self._enc.decode([token])} inside a message header")
        elif token in HEADER_SPECIALS and state == "Header":
            return self._feed_harmony(token)
        return [ParseWarning(f"special token {self._enc.decode([token])} out of place; dropped")]

    def _feed_harmony(self, token: int) -> list[Event]:
        events: list[Event] = []
        self._pending.append(token)
        try:
            self._parser.process(token)
        except BaseException as e:  # noqa: BLE001 - harmony's errors (and Rust panics); never out
            return self._salvage(f"malformed harmony output at token {token}: {e}")
        delta = self._parser.last_content_delta
        if delta:
            events += self._route(delta)
        if token in ENDS:
            events += self._close_message()
        elif len(self._pending) > MAX_HEADER_TOKENS and self._parser.state.value == "Header":
            events += self._enter_text_mode()
        return events

    def _enter_text_mode(self) -> list[Event]:
        events: list[Event] = [ParseWarning(f"no message header after {MAX_HEADER_TOKENS} "
                                            "tokens; streaming the output as text")]
        pending, self._pending = self._pending, []
        self._text_tokens, self._text_shown = [], 0
        for t in pending:  # the header's ordinary tokens (its specials are never text)
            if not self._enc.is_special_token(t):
                events += self._feed_text(t)
        return events

    def _feed_text(self, token: int) -> list[Event]:
        if token == START:  # the model found its way back to the format
            self._text_tokens = None
            self._new_parser(expect_role=False)
            return self.feed(token)
        if not self._is_valid(token) or self._enc.is_special_token(token):
            return []
        self._text_tokens.append(token)
        text = self._enc.decode(self._text_tokens)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return []
        delta, self._text_shown = text[self._text_shown:], len(text)
        return [ContentDelta(delta)] if delta else []

    def finish(self) -> list[Event]:
        """Call at the end of generation (stop token, max_tokens, cancel)."""
        events: list[Event] = []
        if self._text_tokens is not None:
            text = self._enc.decode(self._text_tokens)
            tail = text[self._text_shown:]
            self._text_tokens = None
            return ([ContentDelta(tail)] if tail else []) + [MessageDone(None, None)]
        if not self._pending:
            return events
        state = self._parser.state.value
        if state == "Content":
            events.append(ParseWarning("output ended inside a message (truncated)"))
            events += self._close_message()
        else:
            events += self._salvage("output ended inside a message header")
        return events

    # ---- internals -------------------------------------------------------------------
    def _route(self, delta: str) -> list[Event]:
        channel = self._parser.current_channel
        recipient = self._parser.current_recipient
        events: list[Event] = []
        if not self._channel_checked:
            self._channel_checked = True
            if channel not in CHANNELS:
                events.append(ParseWarning(f"unknown channel {channel!r}; shown as text"))
            if recipient and not recipient.startswith("functions.") \
                    and not self._is_builtin(recipient):
                events.append(ParseWarning(f"message to unsupported recipient {recipient!r}; "
                                           "shown as text"))
        self._emitted += delta
        if recipient and recipient.startswith("functions."):
            name = recipient.removeprefix("functions.")
            first = self._call_index is None
            if first:
                self._call_index = self._num_calls
                self._num_calls += 1
            events.append(ToolCallDelta(self._call_index, name if first else None, delta))
        elif recipient and self._is_builtin(recipient):
            if self._builtin_index is None:
                self._builtin_index = self._num_builtin
                self._num_builtin += 1
            events.append(BuiltinCallDelta(self._builtin_index, recipient, delta))
        elif channel == "analysis" and not recipient:
            events.append(ReasoningDelta(delta))
        else:  # final, a preamble on commentary, an unknown channel or recipient
            events.append(ContentDelta(delta))
        return events

    def _close_message(self) -> list[Event]:
        events: list[Event] = []
        channel, recipient = self._last_header()
        full = self._last_content()
        if len(full) > len(self._emitted) and full.startswith(self._emitted):
            # harmony kept text it never streamed (e.g. a message with no header): show it
            if channel is None:
                events.append(ParseWarning("message without a channel header; shown as text"))
            events += self._route(full[len(self._emitted):])
        if self._call_index is not None or (recipient or "").startswith("functions."):
            name = (recipient or "").removeprefix("functions.")
            args = full
            if self._call_index is None:  # a call with empty arguments
                self._call_index = self._num_calls
                self._num_calls += 1
            events.append(ToolCallDone(self._call_index, name, args, _is_json(args)))
        elif recipient and self._is_builtin(recipient):
            if self._builtin_index is None:  # a call with nothing after its header
                self._builtin_index = self._num_builtin
                self._num_builtin += 1
            events.append(BuiltinCallDone(self._builtin_index, recipient, full))
        events.append(MessageDone(channel, recipient))
        if channel == "analysis" and not recipient:
            self.reasoning_tokens += len(self._pending)
        self._new_parser(expect_role=False)
        return events

    def _is_builtin(self, recipient: str) -> bool:
        namespace = recipient.split(".", 1)[0]
        return namespace in self._builtin and (namespace != "python" or recipient == "python")

    def _last_header(self) -> tuple[str | None, str | None]:
        msgs = self._parser.messages
        if msgs:
            return msgs[-1].channel, msgs[-1].recipient
        return self._parser.current_channel, self._parser.current_recipient

    def _last_content(self) -> str:
        msgs = self._parser.messages
        if msgs and msgs[-1].content:
            return "".join(getattr(c, "text", "") for c in msgs[-1].content)
        return self._parser.current_content

    def _salvage(self, why: str) -> list[Event]:
        """Show the ordinary tokens of the broken message as text, then start afresh."""
        events: list[Event] = [ParseWarning(why)]
        if not self._emitted:
            text = self._enc.decode([t for t in self._pending if not self._enc.is_special_token(t)])
            if text:
                events.append(ContentDelta(text))
        events.append(MessageDone(None, None))
        self._new_parser(expect_role=False)
        return events


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def parse_completion(tokens: list[int]) -> ParsedOutput:
    """Parse a whole completion (non-streaming)."""
    parser, out = OutputParser(), ParsedOutput()
    for t in tokens:
        out.add(parser.feed(t))
    out.add(parser.finish())
    return out
