"""POST /v1/responses request, as the `openai` client sends it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inhouse.server.protocol.common import FUNCTION_NAME, Strict, check_parameters_schema


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _check = field_validator("parameters")(classmethod(lambda cls, v: check_parameters_schema(v)))


class UserLocation(Strict):
    type: Literal["approximate"] = "approximate"
    city: str | None = None
    country: str | None = None
    region: str | None = None
    timezone: str | None = None


class WebSearchTool(Strict):
    """The browser over the organisation's documents (there is no web here)."""
    type: Literal["web_search", "web_search_2025_08_26", "web_search_preview",
                  "web_search_preview_2025_03_11"]
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: UserLocation | None = None
    external_web_access: bool | None = None
    filters: dict[str, Any] | None = None
    search_content_types: list[Literal["text", "image"]] | None = None


class ContainerAuto(Strict):
    type: Literal["auto"]
    file_ids: list[str] | None = None
    memory_limit: Literal["1g", "4g", "16g", "64g"] | None = None


class CodeInterpreterTool(Strict):
    """python in the sandbox; `container`: a container id to keep using, or "auto"."""
    type: Literal["code_interpreter"]
    container: str | ContainerAuto


Tool = Annotated[FunctionTool | WebSearchTool | CodeInterpreterTool, Field(discriminator="type")]


class TextPart(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class Summary(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Summary] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class BuiltinCallItem(BaseModel):
    """An earlier turn's web_search_call or code_interpreter_call, sent back as history (read
    and dropped: see openai_shapes.messages_from_items)."""
    model_config = ConfigDict(extra="allow")
    type: Literal["web_search_call", "code_interpreter_call"]
    id: str | None = None


InputItem = (MessageItem | ReasoningItem | FunctionCallItem | FunctionCallOutputItem
             | BuiltinCallItem)


class Reasoning(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJsonObject(Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema,
                       Field(discriminator="type")]


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None  # extension: OpenAI's Responses API has none; ours is reproducible
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    background: bool | None = None
    service_tier: str | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
