"""The web UI's own request bodies (not OpenAI's): conversations as the page keeps them. Every
field is bounded and unknown fields are refused, like the OpenAI shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UIToolCall(_Strict):
    kind: Literal["web_search", "code_interpreter", "function"]
    title: str = Field(max_length=200)
    detail: str = Field(default="", max_length=20_000)
    output: str | None = Field(default=None, max_length=100_000)


class UICitation(_Strict):
    """A url_citation of the answer: the document's title and its inhouse:// address."""

    title: str = Field(default="", max_length=500)
    url: str = Field(max_length=2_000)


class UIMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=200_000)
    reasoning: str | None = Field(default=None, max_length=200_000)
    tools: list[UIToolCall] = Field(default_factory=list, max_length=64)
    citations: list[UICitation] = Field(default_factory=list, max_length=64)
    model: str | None = Field(default=None, max_length=200)
    response_id: str | None = Field(default=None, max_length=100)
    finish: str | None = Field(default=None, max_length=40)
    error: str | None = Field(default=None, max_length=2_000)


class ConversationIn(_Strict):
    title: str = Field(min_length=1, max_length=200)
    messages: list[UIMessage] = Field(default_factory=list, max_length=1000)


class ConversationPatch(_Strict):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    messages: list[UIMessage] | None = Field(default=None, max_length=1000)
