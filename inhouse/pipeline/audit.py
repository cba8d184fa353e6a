"""What the server writes to the audit log for each request: a `request` leaf before generation
starts (so a crash leaves an honest incomplete entry) and a `completion` leaf before the response
completes. Leaves hold salted hashes of the token ids; with `audit_content="full"` the exact ids
and texts go to the erasable content table."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path

from inhouse import __version__
from inhouse.config import ServerSettings, cache_root
from inhouse.governance.audit_log import (AuditLog, default_key_path, default_url,
                                          load_signing_key)
from inhouse.governance.pii import redact_texts
from inhouse.governance.privacy import PersonalData
from inhouse.governance.tenancy import Caller
from inhouse.governance.database import private_dir
from inhouse.pipeline.chat import ChatTurn, Finished, engine_params
from inhouse.pipeline.offload import Offload


def _salt(configured: str = "") -> bytes:
    """A per-deployment secret, so that hashes of short prompts cannot be guessed offline. Every
    API process of a deployment reads the same file (`serve --audit-salt`), so that their hashes
    of one text are one hash; created where missing."""
    path = Path(configured) if configured else cache_root() / "audit-salt"
    if not path.is_file():
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def open_audit_log(settings: ServerSettings) -> AuditLog:
    from inhouse.governance.witness import open_witness

    key = Path(settings.audit_signing_key) if settings.audit_signing_key else default_key_path()
    witness = open_witness(settings.audit_witness) if settings.audit_witness else None
    return AuditLog(settings.audit_database_url or default_url(), load_signing_key(key),
                    checkpoint_seconds=settings.audit_seal_seconds, witness=witness)


class Auditor:
    """Writes a turn's leaves. Retention runs here too, over every store (`PersonalData`)."""

    def __init__(self, log: AuditLog | None, settings: ServerSettings,
                 data: PersonalData | None = None, offload: Offload | None = None) -> None:
        self.log, self.settings, self.data = log, settings, data
        self.offload = offload or Offload()
        self._salt = _salt(settings.audit_salt) if log is not None else b""
        self._retention_checked = 0.0

    async def _retention(self) -> None:
        """Erase content and stored responses older than `retain_days`, at most once an hour."""
        days = self.settings.retain_days
        if not days or self.data is None or time.time() - self._retention_checked < 3600:
            return
        self._retention_checked = time.time()
        await asyncio.to_thread(self.data.retain, days)

    def _hash(self, ids) -> str:
        return hashlib.sha256(self._salt + ",".join(map(str, ids)).encode()).hexdigest()

    async def start(self, endpoint: str, caller: Caller, turns: list[ChatTurn],
                    pii_labels: frozenset[str] = frozenset(), extra: dict | None = None) -> None:
        """One `request` leaf per choice, committed before generation starts. The choices share
        their messages, so their content is redacted once. `extra`: inputs that shape the
        output beyond the turn itself (stop strings, ...)."""
        if self.log is None or not turns:
            return
        content = None
        messages = turns[0].messages
        if self.settings.audit_content == "full":
            content = {"messages": [dataclasses.asdict(m) for m in messages]}
        elif self.settings.audit_content == "redacted":
            content = {"messages": await self._redacted(messages)}
        for turn in turns:
            record = self._request_record(endpoint, caller, turn, pii_labels, extra)
            await asyncio.to_thread(self.log.append, record, content, turn.request_id, "request",
                                    caller.subject)
        await self._retention()

    def _request_record(self, endpoint: str, caller: Caller, turn: ChatTurn,
                        pii_labels: frozenset[str], extra: dict | None) -> dict:
        adapter = turn.params.adapter
        record = {"endpoint": endpoint, "api_key_id": caller.key_id, "tenant": caller.tenant,
                  "model": self.settings.model_name,
                  "model_digest": self.settings.model_digest, "adapter": adapter,
                  "adapter_digest": dict(self.settings.adapters).get(adapter) if adapter else None,
                  "engine": {"version": __version__, "mode": self.settings.engine_mode,
                             "dtype": self.settings.model_dtype, "kernel": self.settings.kernel},
                  "params": dataclasses.asdict(engine_params(turn)),
                  "reasoning_effort": turn.options.reasoning_effort,
                  "num_messages": len(turn.messages),
                  # the definitions, not just the names: they shape the prompt and the answer
                  "tools": [dataclasses.asdict(t) for t in turn.options.tools],
                  "content_mode": self.settings.audit_content} | (extra or {})
        record["pii"] = {"mode": self.settings.pii_mode, "labels": sorted(pii_labels)}
        return record

    async def _redacted(self, messages) -> list[dict]:
        """The messages with PII replaced by [LABEL]: off the event loop, since redaction scans
        every character (a worker process for large prompts)."""
        texts = tuple(t for m in messages for t in (m.content, m.reasoning or ""))
        red = iter(await self.offload.run(sum(map(len, texts)), redact_texts, texts))
        out = []
        for m in messages:
            d = dataclasses.asdict(m)
            d["content"], reasoning = next(red), next(red)
            if m.reasoning:
                d["reasoning"] = reasoning
            out.append(d)
        return out

    async def ended(self, record_id: str, caller: Caller, finish_reason: str,
                    status: int | None = None, error: str | None = None) -> None:
        """The `completion` leaf of a turn that produced no `Finished`: refused after its request
        leaf (status), its client went away ("disconnect"), or it failed ("error")."""
        if self.log is not None:
            record = {"finish_reason": finish_reason, "status": status, "error": error}
            await asyncio.to_thread(self.log.append, {k: v for k, v in record.items()
                                                      if v is not None},
                                    None, record_id, "completion", caller.subject)

    async def tool(self, record_id: str, caller: Caller, call) -> None:
        """A `tool` leaf: a built-in tool call the server ran for the step `record_id` (a
        `ToolCallFinished`), with digests of what the model sent and what it read back; the
        texts themselves go to the erasable content (redacted, or in full, as the deployment
        keeps content)."""
        if self.log is None:
            return
        record = {"call_id": call.call_id, "recipient": call.recipient,
                  "status": call.status, "container_id": call.container_id,
                  "arguments_sha256": self._hash_text(call.arguments),
                  "output_sha256": self._hash_text(call.output),
                  "output_chars": len(call.output), "duration_s": round(call.duration_s, 4)}
        content = await self._kept({"tool_arguments": call.arguments,
                                    "tool_output": call.output})
        await asyncio.to_thread(self.log.append, record, content, record_id, "tool",
                                caller.subject)

    async def policy(self, record_id: str, caller: Caller, stage: str, verdict, action: str,
                     policy_sha256: str, guard: str) -> None:
        """A `policy` leaf: the guard's verdict on a record's input or answer (`Verdict`), what
        was done (flag, block, or pass), and a digest of the rationale (the rationale itself in
        the content, as the deployment keeps content)."""
        if self.log is None:
            return
        record = {"stage": stage, "violation": verdict.violation, "category": verdict.category,
                  "complete": verdict.complete, "action": action, "policy_sha256": policy_sha256,
                  "guard": guard, "rationale_sha256": verdict.rationale_sha256}
        content = await self._kept({f"policy_{stage}_rationale": verdict.rationale})
        await asyncio.to_thread(self.log.append, record, content, record_id, "policy",
                                caller.subject)

    async def _kept(self, texts: dict[str, str]) -> dict[str, str] | None:
        """Texts as the deployment keeps content: in full, redacted (off the event loop), or
        not at all."""
        if self.settings.audit_content == "full":
            return dict(texts)
        if self.settings.audit_content != "redacted":
            return None
        values = tuple(texts.values())
        red = await self.offload.run(sum(map(len, values)), redact_texts, values)
        return dict(zip(texts, red))

    def _hash_text(self, text: str) -> str:
        return hashlib.sha256(self._salt + text.encode("utf-8", "surrogatepass")).hexdigest()

    async def complete(self, record_id: str, caller: Caller, f: Finished,
                       answer: str | None = None) -> None:
        if self.log is None:
            return
        record = {"finish_reason": f.finish_reason, "seed": f.seed,
                  "prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                  "reasoning_tokens": f.reasoning_tokens, "cached_tokens": f.cached_tokens,
                  "prompt_ids_sha256": self._hash(f.prompt_ids),
                  "output_ids_sha256": self._hash(f.output_ids),
                  "time_to_first_token_s": round(f.time_to_first_token_s, 4),
                  "total_s": round(f.total_s, 4)}
        if f.error:
            record["error"] = f.error
        content = None
        if self.settings.audit_content == "full":
            content = {"prompt_ids": list(f.prompt_ids), "output_ids": list(f.output_ids),
                       "answer": answer}
        elif self.settings.audit_content == "redacted":  # no ids: they would decode to the PII
            content = {"answer": (await self.offload.run(len(answer or ""), redact_texts,
                                                         (answer or "",)))[0]}
        await asyncio.to_thread(self.log.append, record, content, record_id, "completion",
                                caller.subject)
