"""Conversation in, parsed events out: harmony rendering + the engine + harmony parsing
(`stream_chat`, used by the CLI), and the governed turn around it (`GovernedTurns`: caller, PII,
audit, metrics, storage), which every server entry point takes.
"""

from inhouse.pipeline.chat import (ChatResult, ChatTurn, Finished, TokenEvent, run_chat,
                                   stream_chat)
from inhouse.pipeline.governed import GovernedTurn, GovernedTurns, TurnObserver, TurnRequest

__all__ = ["ChatResult", "ChatTurn", "Finished", "GovernedTurn", "GovernedTurns", "TokenEvent",
           "TurnObserver", "TurnRequest", "run_chat", "stream_chat"]
