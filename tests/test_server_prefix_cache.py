"""Prefix caching through the server (issue 20), tried as a tenant who wants another's prompts:
`cached_tokens` tells the truth in both APIs, never crosses tenants, lands in the audit record,
and a request that hit the cache replays bit for bit."""

from __future__ import annotations

import httpx
import openai
import pytest
from typer.testing import CliRunner

from inhouse.cli import app as cli
from inhouse.config import EngineConfig, ServerSettings, cache_root
from inhouse.engine import AsyncEngine, LLMEngine
from inhouse.governance.audit_log import AuditLog, load_signing_key
from inhouse.governance.keys import KeyStore
from inhouse.kernels import arithmetic
from inhouse.model import find_checkpoint, load_model
from inhouse.model.digest import checkpoint_digest
from inhouse.server import build_app
from tests.server_utils import running_server

MODEL = "tiny-test"
DOC = " ".join(f"clause {i}: the tenant shall keep the premises in good repair." for i in range(12))


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """A real tiny model in reproducible mode, prefilling (and so caching) in 16-token chunks;
    keys of two tenants; the audit log keeps token ids (what replay needs)."""
    path = checkpoints["hf"]
    tmp = tmp_path_factory.mktemp("prefix")
    url = f"sqlite:///{tmp / 'inhouse.db'}"
    keys, log = KeyStore(url), AuditLog(url, load_signing_key(cache_root() / "audit-signing.key"))
    granted = {name: keys.create(name, "user", tenant=tenant)[1] for name, tenant in
               [("a1", "acme"), ("a2", "acme"), ("b", "globex")]}
    granted["admin"] = keys.create("ops", "admin")[1]
    settings = ServerSettings(model_name=MODEL, database_url=url, audit_database_url=url,
                              audit_content="full", engine_mode="reproducible",
                              model_digest=checkpoint_digest(find_checkpoint(path)),
                              model_dtype="float32", kernel=arithmetic.path_name())
    engine = AsyncEngine(LLMEngine(load_model(path), EngineConfig(
        mode="reproducible", prefill_chunk=16, block_size=16)))
    with running_server(build_app(engine, settings, audit_log=log, key_store=keys)) as u:
        yield u, granted, log, url, path
    engine.shutdown()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def chat(url, key, content, **kw):
    return client(url, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4, seed=1, **kw)


def test_cached_tokens_are_the_truth_and_stay_within_a_tenant(served):
    u, keys, *_ = served
    first = chat(u, keys["a1"], DOC + " Summarise.")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = chat(u, keys["a2"], DOC + " List the clauses.")  # the same tenant, another key
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    # another tenant sends the very same prompt: nothing of acme's is reused, or can be timed
    other = chat(u, keys["b"], DOC + " List the clauses.")
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == again.choices[0].message.content  # same seed
    # the Responses API reports it too
    r = client(u, keys["a1"]).responses.create(model=MODEL, input=DOC + " Count them.",
                                               max_output_tokens=4, extra_body={"seed": 1})
    assert r.usage.input_tokens_details.cached_tokens == cached


def test_a_conversation_reuses_its_earlier_turns(served):
    u, keys, *_ = served
    c = client(u, keys["b"])
    turn = c.responses.create(model=MODEL, input="Let us talk about " + DOC, max_output_tokens=6,
                              extra_body={"seed": 2}, store=True)
    for _ in range(2):
        prev = turn
        turn = c.responses.create(model=MODEL, input="Go on.", previous_response_id=prev.id,
                                  max_output_tokens=6, extra_body={"seed": 2}, store=True)
        # at least the last prompt's whole chunks
        assert turn.usage.input_tokens_details.cached_tokens >= prev.usage.input_tokens // 16 * 16
    metrics = httpx.get(f"{u}/metrics", headers={"Authorization": f"Bearer {keys['admin']}"}).text
    hit = [line for line in metrics.splitlines()
           if line.startswith("inhouse_prefix_cache_hit_tokens_total")]
    assert hit and float(hit[0].split()[-1]) > 0


def test_a_request_that_hit_the_cache_replays_bit_for_bit(served):
    u, keys, log, url, path = served
    chat(u, keys["a1"], DOC + " Which clause is first?", temperature=1.0)
    hot = chat(u, keys["a1"], DOC + " Which clause is last?", temperature=1.0)
    assert hot.usage.prompt_tokens_details.cached_tokens > 0
    done = [r for r in log.list(limit=1000) if r["kind"] == "completion"
            and r.get("cached_tokens", 0) == hot.usage.prompt_tokens_details.cached_tokens]
    assert done
    for record in done[:2]:
        res = CliRunner().invoke(cli, ["audit", "replay", record["record_id"], "--model", str(path),
                                       "--database-url", url])
        assert res.exit_code == 0 and "identical" in res.stdout, res.output
