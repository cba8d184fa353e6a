"""Conversations in OpenAI's chat shape, rendered to harmony prompt tokens by openai-harmony.

Mapping (as OpenAI's gpt-oss guide prescribes):
  system / developer messages -> developer "# Instructions" (the harmony system message carries
                                 identity, knowledge cutoff, date, reasoning effort, channels)
  user                        -> user message
  assistant.reasoning         -> assistant, channel analysis
  assistant.tool_calls[i]     -> assistant to=functions.NAME, channel commentary, <|constrain|>json
  assistant.content           -> assistant, channel final
  tool (result)               -> functions.NAME to=assistant, channel commentary
Earlier reasoning is dropped or kept by harmony itself (auto_drop_analysis): dropped once a turn
ended with a final message, kept inside an unfinished tool loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from inhouse.errors import InhouseError
from inhouse.harmony.vocab import load_encoding

Role = Literal["system", "developer", "user", "assistant", "tool"]
# gpt-oss's own tools, declared in the system message (harmony's namespaces); run by the server
BUILTIN_TOOLS = ("browser", "python")
Effort = Literal["low", "medium", "high"]
EFFORTS = ("low", "medium", "high")
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"


class ConversationError(InhouseError):
    """A conversation that cannot be rendered (unknown role, tool result without a call, ...);
    `param` names the place in the request when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    name: str  # a function's name; for a built-in tool, its recipient ("python", "browser.open")
    arguments: str  # JSON text, as the model wrote it (python: the code)
    id: str = ""
    builtin: bool = False


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str = ""
    reasoning: str | None = None  # assistant only: its chain of thought (analysis channel)
    tool_calls: tuple[ToolCall, ...] = ()  # assistant only
    name: str | None = None  # tool only: the function whose result this is
    tool_call_id: str | None = None  # tool only


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False  # its arguments are held to `parameters` by a grammar


@dataclass(frozen=True)
class PromptOptions:
    reasoning_effort: Effort = "medium"
    current_date: str | None = None  # "YYYY-MM-DD"
    knowledge_cutoff: str = KNOWLEDGE_CUTOFF
    model_identity: str = MODEL_IDENTITY
    tools: tuple[FunctionTool, ...] = field(default_factory=tuple)
    builtin_tools: tuple[str, ...] = ()  # of BUILTIN_TOOLS, in the system message
    python_timeout_s: float = 120.0  # what the python tool's description promises

    def __post_init__(self) -> None:
        unknown = set(self.builtin_tools) - set(BUILTIN_TOOLS)
        if unknown:
            raise ConversationError(f"unknown built-in tool(s) {sorted(unknown)}; there are "
                                    f"{', '.join(BUILTIN_TOOLS)}")
        if self.reasoning_effort not in EFFORTS:
            raise ConversationError(f"reasoning effort must be one of {', '.join(EFFORTS)}, "
                                    f"not {self.reasoning_effort!r}")


def render_prompt(messages: list[ChatMessage], options: PromptOptions = PromptOptions()) -> list[int]:
    """Token ids of the conversation, ending with `<|start|>assistant` for the model to continue."""
    from openai_harmony import Conversation, Role as HRole

    enc = load_encoding()
    try:
        convo = Conversation.from_messages(to_harmony_messages(messages, options))
        return list(enc.render_conversation_for_completion(convo, HRole.ASSISTANT))
    except (ConversationError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - harmony's errors and its Rust panics
        # NOTE: a panic (e.g. the tokenizer's regex overflowing its stack on a megabyte of "{")
        # is a BaseException; it must become this request's 400, never the server's 500
        raise ConversationError(f"the conversation cannot be tokenised ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None


def to_harmony_messages(messages: list[ChatMessage], options: PromptOptions) -> list:
    from openai_harmony import (Author, DeveloperContent, Message, ReasoningEffort, Role as HRole,
                                SystemContent, ToolDescription)

    effort = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM,
              "high": ReasoningEffort.HIGH}[options.reasoning_effort]
    system = (SystemContent.new().with_model_identity(options.model_identity)
              .with_reasoning_effort(effort).with_knowledge_cutoff(options.knowledge_cutoff))
    if options.current_date:
        system = system.with_conversation_start_date(options.current_date)
    for name in BUILTIN_TOOLS:
        if name in options.builtin_tools:
            system = system.with_tools(builtin_namespace(name, options.python_timeout_s))
    out = [Message.from_role_and_content(HRole.SYSTEM, system)]

    instructions = [m.content for m in messages if m.role in ("system", "developer") and m.content]
    if instructions or options.tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if options.tools:
            dev = dev.with_function_tools([ToolDescription.new(t.name, t.description, t.parameters)
                                           for t in options.tools])
        out.append(Message.from_role_and_content(HRole.DEVELOPER, dev))

    called: dict[str, str] = {}  # tool_call_id -> name, to resolve tool results
    pending: list[str] = []  # names of calls still waiting for a result
    builtin_pending: list[str] = []  # built-in calls (recipients) still waiting
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            continue
        if m.role == "user":
            out.append(Message.from_role_and_content(HRole.USER, m.content))
        elif m.role == "assistant":
            if not (m.content or m.reasoning or m.tool_calls):
                raise ConversationError(f"message {i}: assistant message is empty")
            if m.reasoning:
                out.append(Message.from_role_and_content(HRole.ASSISTANT, m.reasoning)
                           .with_channel("analysis"))
            for call in m.tool_calls:
                if call.builtin:  # as gpt-oss calls its own tools: on analysis, `code`
                    out.append(Message.from_role_and_content(HRole.ASSISTANT, call.arguments)
                               .with_channel("analysis").with_recipient(call.name)
                               .with_content_type("code"))
                    builtin_pending.append(call.name)
                    continue
                out.append(Message.from_role_and_content(HRole.ASSISTANT, call.arguments)
                           .with_channel("commentary").with_recipient(f"functions.{call.name}")
                           .with_content_type("<|constrain|>json"))
                if call.id:
                    called[call.id] = call.name
                pending.append(call.name)
            if m.content:
                out.append(Message.from_role_and_content(HRole.ASSISTANT, m.content)
                           .with_channel("final"))
        elif m.role == "tool" and m.name is not None and m.name in builtin_pending:
            builtin_pending.remove(m.name)  # a built-in tool's answer: its author is the tool
            out.append(Message.from_author_and_content(Author.new(HRole.TOOL, m.name), m.content)
                       .with_channel("analysis").with_recipient("assistant"))
        elif m.role == "tool":
            name = m.name or called.get(m.tool_call_id or "")
            if name is None:
                if not pending:
                    raise ConversationError(f"message {i}: tool result without a preceding tool call")
                name = pending[0]
            if name in pending:
                pending.remove(name)
            elif not called and not pending:
                raise ConversationError(f"message {i}: tool result without a preceding tool call")
            out.append(Message.from_author_and_content(Author.new(HRole.TOOL, f"functions.{name}"),
                                                       m.content)
                       .with_channel("commentary").with_recipient("assistant"))
        else:
            raise ConversationError(f"message {i}: unknown role {m.role!r}")
    return out


def builtin_namespace(name: str, python_timeout_s: float = 120.0):
    """Harmony's own declaration of a built-in tool (the text gpt-oss was trained on), told the
    truth about this server: python has no internet and its timeout; the browser's source is
    the organisation's documents, not the web."""
    from openai_harmony import ToolNamespaceConfig

    if name == "python":
        cfg = ToolNamespaceConfig.python()
        text = (cfg.description or "").replace("120.0 seconds", f"{python_timeout_s:.1f} seconds")
        text = text.replace("Internet access for this session is UNKNOWN. Depends on the cluster.",
                            "Internet access for this session is disabled.")
        return ToolNamespaceConfig(name=cfg.name, description=text, tools=cfg.tools)
    cfg = ToolNamespaceConfig.browser()
    text = (cfg.description or "").replace("sources=web (default: web)",
                                           "sources=documents (default: documents)")
    return ToolNamespaceConfig(name=cfg.name, description=text, tools=cfg.tools)


def tool_result_ids(recipient: str, text: str) -> list[int]:
    """A built-in tool's answer as the model reads it, then `<|start|>assistant` for the model to
    continue: `<|start|>{recipient} to=assistant<|channel|>analysis<|message|>{text}<|end|>`."""
    from openai_harmony import Author, Message, Role as HRole

    enc = load_encoding()
    message = (Message.from_author_and_content(Author.new(HRole.TOOL, recipient), text)
               .with_channel("analysis").with_recipient("assistant"))
    return list(enc.render(message)) + list(enc.encode("<|start|>assistant",
                                                       allowed_special="all"))


def stop_token_ids() -> list[int]:
    """`<|return|>` and `<|call|>`: never `<|end|>`, which separates analysis from final."""
    return list(load_encoding().stop_tokens_for_assistant_actions())


def decode(ids: list[int]) -> str:
    return load_encoding().decode(ids)


def encode_text(text: str) -> list[int]:
    """Plain text to ids; special-token look-alikes stay text."""
    return load_encoding().encode(text, disallowed_special=())
