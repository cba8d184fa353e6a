"""POST /v1/moderations request, as the `openai` client sends it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from inhouse.server.protocol.common import Strict


class TextInput(Strict):
    type: Literal["text"]
    text: str


class ModerationRequest(Strict):
    input: str | list[str] | list[TextInput] = Field(min_length=1)
    model: str | None = None
