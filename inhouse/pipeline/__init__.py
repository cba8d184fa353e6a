"""Conversation in, parsed events out: harmony rendering + the engine + harmony parsing.

Used by the CLI (`chat`, `generate`) and, later, by the server's Chat Completions and Responses
endpoints, so that every answer goes through the same path.
"""

from inhouse.pipeline.chat import (ChatResult, ChatTurn, Finished, TokenEvent, run_chat,
                                   stream_chat)

__all__ = ["ChatResult", "ChatTurn", "Finished", "TokenEvent", "run_chat", "stream_chat"]
