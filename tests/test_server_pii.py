"""PII policies through the real server: block, mask (restored in the answer), redacted audit."""

import httpx
from openai import OpenAI

from inhouse.config import ServerSettings
from inhouse.governance.audit_log import AuditLog
from inhouse.server import build_app
from tests.server_utils import ScriptedEngine, running_server

MODEL = "tiny-test"
SECRET = "My SIN is 130 692 544, mail jane@x.org"
# the scripted model repeats the placeholders it was shown, split across tokens
ECHO = ("<|channel|>analysis<|message|>User gave <SIN_1>.<|end|><|start|>assistant"
        "<|channel|>final<|message|>Noted <SIN_1> and <EMAIL_1>.<|return|>")


def test_block_mode_refuses_with_a_clear_400(tmp_path):
    app = build_app(ScriptedEngine(ECHO), ServerSettings(model_name=MODEL, pii_mode="block"),
                    audit_log=AuditLog(f"sqlite:///{tmp_path / 'a.db'}"))
    with running_server(app) as u:
        r = httpx.post(f"{u}/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "pii_blocked"
        assert "EMAIL, SIN" in r.json()["error"]["message"]
        r = httpx.post(f"{u}/v1/responses", json={"model": MODEL, "input": SECRET})
        assert r.status_code == 400
        ok = httpx.post(f"{u}/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}]})
        assert ok.status_code == 200


def test_mask_mode_hides_pii_from_the_model_and_restores_it(tmp_path):
    engine = ScriptedEngine(ECHO)
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    app = build_app(engine, ServerSettings(model_name=MODEL, pii_mode="mask"), audit_log=log)
    with running_server(app) as u:
        c = OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}])
        chunks = list(c.chat.completions.create(model=MODEL, stream=True,
                                                messages=[{"role": "user", "content": SECRET}]))
    prompt = engine.prompt_text(0)
    assert "130 692 544" not in prompt and "jane@x.org" not in prompt and "<SIN_1>" in prompt
    assert r.choices[0].message.content == "Noted 130 692 544 and jane@x.org."
    assert r.choices[0].message.model_extra["reasoning"] == "User gave 130 692 544."
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == "Noted 130 692 544 and jane@x.org."
    start = log.get(log.list()[0]["record_id"])[0]
    assert start["pii"] == {"mode": "mask", "labels": ["EMAIL", "SIN"]}


def test_redacted_audit_content_is_the_default(tmp_path):
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}")
    app = build_app(ScriptedEngine("<|channel|>final<|message|>Call 416-555-0199.<|return|>"),
                    ServerSettings(model_name=MODEL), audit_log=log)
    with running_server(app) as u:
        httpx.post(f"{u}/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
    content = log.get(log.list()[0]["record_id"])[0]["content"]
    assert content["messages"][0]["content"] == "My SIN is [SIN], mail [EMAIL]"
    assert content["answer"] == "Call [PHONE]." and "prompt_ids" not in content


def test_responses_mask_mode_and_custom_patterns(tmp_path):
    engine = ScriptedEngine("<|channel|>final<|message|>File <PATIENT_1> for <EMAIL_1>.<|return|>")
    settings = ServerSettings(model_name=MODEL, pii_mode="mask",
                              pii_patterns=(("PATIENT", r"PT-\d{6}"),))
    app = build_app(engine, settings, audit_log=AuditLog(f"sqlite:///{tmp_path / 'a.db'}"))
    with running_server(app) as u:
        c = OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        r = c.responses.create(model=MODEL, input="Patient PT-004211, mail jane@x.org")
        events = list(c.responses.create(model=MODEL, input="Patient PT-004211, mail jane@x.org",
                                         stream=True))
    assert "PT-004211" not in engine.prompt_text(0) and "<PATIENT_1>" in engine.prompt_text(0)
    assert r.output_text == "File PT-004211 for jane@x.org."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        "File PT-004211 for jane@x.org."


def test_stored_responses_keep_ids_that_look_like_pii(tmp_path, monkeypatch):
    """About one random id in 300 holds a digit run the detectors take for a SIN: under --pii
    mask the stored response must keep its ids (and so answer its GET), while the text in it is
    masked."""
    from inhouse.governance.pii import detect
    from inhouse.server.serving import response_builder, responses

    count = iter(range(10**6))

    def sin_like(prefix: str) -> str:
        return f"{prefix}_d8892c6aaebeb189061658b{next(count):x}"

    assert detect(sin_like("resp"))  # the premise: a detector finds a SIN in such an id
    monkeypatch.setattr(responses, "new_id", sin_like)
    monkeypatch.setattr(response_builder, "new_id", sin_like)
    engine = ScriptedEngine("<|channel|>final<|message|>Noted <SIN_1>.<|return|>")
    settings = ServerSettings(model_name=MODEL, pii_mode="mask",
                              database_url=f"sqlite:///{tmp_path / 'store.db'}")
    app = build_app(engine, settings, audit_log=AuditLog(f"sqlite:///{tmp_path / 'a.db'}"))
    with running_server(app) as u:
        c = OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        r = c.responses.create(model=MODEL, input="My SIN is 130 692 544", store=True)
        got = httpx.get(f"{u}/v1/responses/{r.id}")
    assert got.status_code == 200 and got.json()["id"] == r.id
    assert [o["id"] for o in got.json()["output"]] == [o.id for o in r.output]
    assert r.output_text == "Noted 130 692 544."  # restored in the answer,
    assert "130 692 544" not in got.text and "<SIN_1>" in got.text  # masked in the store
