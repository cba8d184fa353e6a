"""Built-in tools in the governed turn: which ones a turn may call, running a call (the server
executes it; the model reads the result and goes on), and the events serving shapes into
`web_search_call` / `code_interpreter_call` items.

The browser searches the caller's tenant's documents only; python runs in the caller's own
sandboxed session (`container_id`: a Responses client may name it again to keep its state).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from inhouse.errors import RequestError
from inhouse.harmony import BUILTIN_TOOLS
from inhouse.tools.browser import Browser, Citation
from inhouse.tools.documents import DocumentStore
from inhouse.tools.python import PythonSessions, SessionNotFound
from inhouse.tools.sandbox import SandboxLimits, SandboxUnavailable

MAX_ARGUMENT_CHARS = 64 << 10  # a call's code or arguments; longer is refused to the model


@dataclass(frozen=True)
class BuiltinRequest:
    """What a request turns on: the tools, python's container (None: a new one), and how many
    search results the browser shows."""

    names: tuple[str, ...]
    container_id: str | None = None
    max_results: int = 8


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    recipient: str  # "python", "browser.search", ...
    arguments: str  # python's code, the browser's JSON arguments
    container_id: str | None


@dataclass(frozen=True)
class ToolCallFinished:
    call_id: str
    recipient: str
    arguments: str
    output: str  # what the model reads
    status: str  # "completed" | "failed" | "incomplete" (python stopped: time, memory, killed)
    container_id: str | None
    duration_s: float
    sources: tuple[str, ...] = ()  # a search's results: the documents' URLs, best first


@dataclass(frozen=True)
class AnswerCitations:
    """Sent before a turn's `Finished`: the answer's citation marks that point at documents."""

    citations: tuple[Citation, ...]


class BuiltinTools:
    """The deployment's built-in tools. The python sandbox is probed on first use; where it
    cannot be set up, asking for python is refused (400) with the reason."""

    def __init__(self, documents: DocumentStore | None, limits: SandboxLimits = SandboxLimits(),
                 max_calls: int = 8, max_sessions: int = 16) -> None:
        self.documents, self.limits, self.max_calls = documents, limits, max_calls
        self.max_sessions = max_sessions
        self._sessions: PythonSessions | None = None

    def sessions(self) -> PythonSessions:
        if self._sessions is None:
            try:
                self._sessions = PythonSessions(self.limits, self.max_sessions)
            except SandboxUnavailable as e:
                raise RequestError(f"the python tool is not available on this server: {e}",
                                   param="tools") from None
        return self._sessions

    def check(self, request: BuiltinRequest, tenant: str) -> None:
        """Refuse, before any output, what this server cannot run for this caller."""
        for name in request.names:
            if name not in BUILTIN_TOOLS:
                raise RequestError(f"unknown built-in tool {name!r}", param="tools")
        if "browser" in request.names and self.documents is None:
            raise RequestError("this server has no document index for the browser tool",
                               param="tools")
        if "python" in request.names:
            sessions = self.sessions()
            cid = request.container_id
            if cid is not None and not sessions.owns(cid, tenant):
                raise RequestError(f"no container '{cid}' (containers last while in use; "
                                   "this one has ended or was never yours)",
                                   param="tools", code="container_not_found", status=404)

    def for_turn(self, request: BuiltinRequest, tenant: str, first_choice: bool) -> TurnTools:
        container = None
        if "python" in request.names:
            sessions = self.sessions()
            container = (request.container_id if first_choice and request.container_id
                         else sessions.new_id())
        browser = (Browser(self.documents, tenant, request.max_results)
                   if "browser" in request.names and self.documents is not None else None)
        return TurnTools(self, request.names, tenant, container, browser)

    def close(self) -> None:
        if self._sessions is not None:
            self._sessions.close()


class TurnTools:
    """One choice's tools: its browser pages (the cursors its citations name) and its python
    container. `run` never raises for the model's mistakes: they are the result it reads."""

    def __init__(self, tools: BuiltinTools, names: tuple[str, ...], tenant: str,
                 container_id: str | None, browser: Browser | None) -> None:
        self.tools, self.names, self.tenant = tools, names, tenant
        self.container_id, self.browser = container_id, browser
        self.num_calls = 0

    @property
    def max_calls(self) -> int:
        return self.tools.max_calls

    def can_call(self) -> bool:
        return self.num_calls < self.max_calls

    def started(self, recipient: str, arguments: str) -> ToolCallStarted:
        return ToolCallStarted(f"call_{secrets.token_hex(12)}", recipient, arguments,
                               self.container_id if recipient == "python" else None)

    async def run(self, call: ToolCallStarted) -> ToolCallFinished:
        self.num_calls += 1
        t0 = time.monotonic()
        pages = len(self.browser.pages) if self.browser is not None else 0
        output, status = await self._run(call.recipient, call.arguments)
        sources: tuple[str, ...] = ()
        if call.recipient == "browser.search" and self.browser is not None \
                and len(self.browser.pages) > pages:
            sources = self.browser.sources(self.browser.pages[-1])
        return ToolCallFinished(call.call_id, call.recipient, call.arguments, output, status,
                                call.container_id, time.monotonic() - t0, sources)

    async def _run(self, recipient: str, arguments: str) -> tuple[str, str]:
        if len(arguments) > MAX_ARGUMENT_CHARS:
            return f"Error: the call is longer than {MAX_ARGUMENT_CHARS} characters", "failed"
        if recipient == "python" and "python" in self.names:
            try:
                session = self.tools.sessions().get(self.container_id, self.tenant)
            except (SessionNotFound, RequestError) as e:
                return f"Error: {e}", "failed"
            result = await asyncio.to_thread(session.run, arguments)
            return result.text(), "incomplete" if result.restarted else "completed"
        namespace, _, function = recipient.partition(".")
        if namespace == "browser" and self.browser is not None:
            text = await asyncio.to_thread(self.browser.call, function, arguments)
            return text, "failed" if text.startswith('{"error"') else "completed"
        return f"Error: no tool {recipient!r} in this conversation", "failed"

    def citations(self, answer: str) -> tuple[Citation, ...]:
        return tuple(self.browser.citations(answer)) if self.browser is not None else ()
