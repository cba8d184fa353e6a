"""Which built-in tools a request turns on: Responses' `web_search*` and `code_interpreter` tools
(the browser over the organisation's documents, python in the sandbox), or for Chat Completions,
which has no such tool types, the server's `--builtin-tools`. What cannot be honoured is refused
(400, naming the parameter), never ignored."""

from __future__ import annotations

from inhouse.config import ServerSettings
from inhouse.pipeline.tools import BuiltinRequest
from inhouse.server.errors import APIError
from inhouse.server.protocol.responses import CodeInterpreterTool, WebSearchTool

RESULTS = {"low": 3, "medium": 8, "high": 15}  # search_context_size -> results shown
MEMORY = {"1g": 1 << 10, "4g": 4 << 10, "16g": 16 << 10, "64g": 64 << 10}  # MiB


def builtin_from_responses(tools: list | None, settings: ServerSettings) -> BuiltinRequest | None:
    names: list[str] = []
    container, results = None, RESULTS["medium"]
    for i, t in enumerate(tools or ()):
        where = f"tools[{i}]"
        if isinstance(t, WebSearchTool):
            if t.external_web_access:
                raise APIError(400, "this server has no web access: its web search is the "
                               "organisation's own document index; leave "
                               "'external_web_access' unset or false",
                               param=f"{where}.external_web_access")
            if t.filters:
                raise APIError(400, "web search 'filters' (domains) are not supported: the "
                               "index holds the organisation's documents", param=f"{where}.filters")
            if t.search_content_types and "image" in t.search_content_types:
                raise APIError(400, "image search is not supported",
                               param=f"{where}.search_content_types")
            if "browser" in names:
                raise APIError(400, "give the web search tool once", param=where)
            names.append("browser")
            results = RESULTS[t.search_context_size or "medium"]
        elif isinstance(t, CodeInterpreterTool):
            if "python" in names:
                raise APIError(400, "give the code interpreter tool once", param=where)
            names.append("python")
            if isinstance(t.container, str):
                container = t.container
            else:
                if t.container.file_ids:
                    raise APIError(400, "this server has no Files API: 'file_ids' cannot be "
                                   "mounted; write files to /mnt/data from code instead",
                                   param=f"{where}.container.file_ids")
                limit = t.container.memory_limit
                if limit is not None and MEMORY[limit] > settings.python_memory_mib:
                    raise APIError(400, f"memory_limit {limit} is above this server's "
                                   f"{settings.python_memory_mib} MiB",
                                   param=f"{where}.container.memory_limit")
    if not names:
        return None
    return BuiltinRequest(tuple(names), container, results)


def builtin_for_chat(settings: ServerSettings) -> BuiltinRequest | None:
    return BuiltinRequest(settings.builtin_tools) if settings.builtin_tools else None
