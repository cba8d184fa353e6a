"""The harmony chat format: conversations -> prompt token ids, generated ids -> typed events.

Built on openai-harmony with the o200k vocabulary set up offline (see vocab.py). No torch here.
"""

from inhouse.harmony.conversation import (BUILTIN_TOOLS, ChatMessage, ConversationError,
                                          FunctionTool, PromptOptions, ToolCall, decode,
                                          encode_text, render_prompt, stop_token_ids,
                                          tool_result_ids)
from inhouse.harmony.parser import (BuiltinCallDelta, BuiltinCallDone, ContentDelta, Event,
                                    MessageDone, OutputParser, ParsedOutput, ParseWarning,
                                    ReasoningDelta, ToolCallDelta, ToolCallDone, parse_completion)
from inhouse.harmony.vocab import ensure_vocab, load_encoding

__all__ = ["BUILTIN_TOOLS", "BuiltinCallDelta", "BuiltinCallDone", "ChatMessage", "ContentDelta", "ConversationError", "Event", "FunctionTool",
           "MessageDone", "OutputParser", "ParsedOutput", "ParseWarning", "PromptOptions",
           "ReasoningDelta", "ToolCall", "ToolCallDelta", "ToolCallDone", "decode", "encode_text",
           "ensure_vocab", "load_encoding", "parse_completion", "render_prompt", "stop_token_ids", "tool_result_ids"]
