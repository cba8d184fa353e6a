"""The web UI in a real browser (Debian's chromium, headless, driven by Playwright) against a real
`inhouse serve` of the trained demo model on 127.0.0.1: a user signs in and chats, an auditor
checks the log and answers a person's export and erasure, an admin manages keys, and a user key
cannot open the console. Every page is watched: a request to anything but the server fails the
test. A failing test leaves a screenshot in test-results/webui/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.webui_utils import CHROMIUM_ARGS, chromium_path, serve_demo

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-results" / "webui"


@pytest.fixture(scope="module")
def served(demo_cache, tmp_path_factory):
    from inhouse.governance.keys import KeyStore
    from inhouse.tools.documents import DocumentStore
    from inhouse.train.demo_tools import index_demo_documents

    work = tmp_path_factory.mktemp("webui")
    keys = KeyStore(f"sqlite:///{work / 'server.db'}")
    index_demo_documents(DocumentStore(f"sqlite:///{work / 'server.db'}"), tenant="clinic")
    made = {"alice": keys.create("alice", "user", tenant="clinic", subject="alice"),
            "limited": keys.create("kiosk", "user", tenant="clinic", subject="kiosk",
                                   rate_limit=4),
            "auditor": keys.create("privacy officer", "auditor", tenant="clinic"),
            "admin": keys.create("it", "admin")}
    with serve_demo(demo_cache, work, "--pii", "block") as s:  # a 400 the page must show
        yield s, {n: k for n, (_, k) in made.items()}, {n: r.id for n, (r, _) in made.items()}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, served, request):
    """A fresh browser context (its own session storage) whose every request must go to the
    server; a screenshot is saved if the test fails."""
    s, _, _ = served
    context = browser.new_context(accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=s.url)
    pg = context.new_page()
    foreign: list[str] = []
    pg.on("request", lambda r: None if r.url.startswith((s.url + "/", "data:", "blob:"))
          else foreign.append(r.url))
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.set_default_timeout(30_000)
    yield pg
    if getattr(request.node, "failed", False):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert foreign == [], f"the page reached outside the server: {foreign}"
    assert problems == [], f"script errors in the page: {problems}"


def sign_in(pg, url: str, key: str) -> None:
    pg.goto(url + "/")
    pg.get_by_label("API key", exact=True).fill(key)
    pg.get_by_role("button", name="Sign in").click()
    pg.locator("#chat").wait_for(state="visible")
    pg.locator("#who", has_text=re.compile(r"\S")).wait_for()


def ask(pg, text: str) -> None:
    pg.get_by_label("Temperature").fill("0")  # the demo model is only sure of itself greedy
    pg.get_by_label("Message", exact=True).fill(text)
    pg.get_by_label("Message", exact=True).press("Enter")


def test_a_user_signs_in_and_sees_the_streamed_answer_and_its_collapsed_reasoning(page, served):
    s, keys, _ = served
    page.goto(s.url + "/")
    page.get_by_label("API key", exact=True).fill("ih-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#signin-error", has_text="not valid").wait_for()
    sign_in(page, s.url, keys["alice"])
    assert "alice" in page.locator("#who").inner_text()
    assert page.locator("#tab-console").is_hidden()  # a user key: no console tab
    page.get_by_label("Reasoning").select_option("low")
    with page.expect_response(lambda r: r.url.endswith("/v1/responses")) as resp:
        ask(page, QUESTION)
    assert resp.value.headers["content-type"].startswith("text/event-stream")  # streamed
    answer = page.locator(".message.assistant .answer")
    answer.filter(has_text=ANSWER).wait_for()
    assert answer.inner_text().strip() == ANSWER
    reasoning = page.locator(".message.assistant details.reasoning")
    assert reasoning.count() == 1 and not reasoning.evaluate("d => d.open")  # collapsed
    assert reasoning.locator("summary").inner_text() == "Reasoning"
    assert not reasoning.locator(".text").is_visible()
    reasoning.locator("summary").click()
    assert "France" in reasoning.locator(".text").inner_text()
    # copy puts the answer on the clipboard
    page.locator(".message.assistant").get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()") == ANSWER
    # the conversation is kept on the server: it is there after a reload, and opens again
    conv = page.locator("#conversations button.conv", has_text=QUESTION)
    conv.wait_for()
    page.reload()
    page.locator("#conversations button.conv", has_text=QUESTION).click()
    page.locator(".message.assistant .answer", has_text=ANSWER).wait_for()
    assert page.locator(".message.user .body").inner_text() == QUESTION
    # regenerate replaces the last answer (greedy again: the reload reset the pickers)
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="Regenerate").click()
    page.locator(".message.assistant .msg-actions").wait_for()
    assert page.locator(".message.assistant").count() == 1
    assert "Paris" in page.locator(".message.assistant .answer").inner_text()


def test_the_composer_stays_in_view_under_a_long_conversation(page, served):
    """The messages scroll inside the page: however long the conversation, Send is on screen
    (the page once grew past the window and pushed it off)."""
    s, keys, _ = served
    page.set_viewport_size({"width": 1024, "height": 600})
    sign_in(page, s.url, keys["alice"])
    for n in range(1, 4):
        ask(page, QUESTION)
        page.locator(f"#messages > :nth-child({2 * n}) .msg-actions").wait_for()
    page.locator("details.reasoning summary").first.click()
    messages = page.locator("#messages")
    assert messages.evaluate("m => m.scrollHeight > m.clientHeight")  # longer than its box
    assert page.evaluate("document.scrollingElement.scrollHeight") == 600  # the page is not
    send = page.locator("#send").bounding_box()
    assert send["y"] + send["height"] <= 600
    last = page.locator(".message.assistant").last.bounding_box()  # scrolled to the answer
    assert last["y"] < 600


def ask_with_tool(pg, served, tool: str, question: str) -> None:
    """Alice asks with one built-in tool ticked and waits for the whole answer."""
    s, keys, _ = served
    sign_in(pg, s.url, keys["alice"])
    pg.get_by_label(tool).check()
    ask(pg, question)
    pg.locator(".message.assistant .msg-actions").wait_for(timeout=60_000)


def test_a_python_tool_call_is_shown_with_its_code_and_output(page, served):
    """The demo calls python for a sum it learned (its numbers are not always the user's: a tiny
    model copies numbers poorly, as test_demo says); the page shows the code, what the sandbox
    printed, and the answer after it."""
    ask_with_tool(page, served, "Python", "What is 17 times 23?")
    tool = page.locator(".message.assistant .tool.code_interpreter")
    assert tool.locator("strong").inner_text() == "Ran Python"
    m = re.fullmatch(r"print\((\d+) ([*+-]) (\d+)\)", tool.locator("pre").first.inner_text())
    assert m, tool.inner_text()
    value = str({"*": int(m[1]) * int(m[3]), "+": int(m[1]) + int(m[3]),
                 "-": int(m[1]) - int(m[3])}[m[2]])
    assert tool.locator("pre").nth(1).inner_text().strip() == value  # the sandbox printed it
    assert page.locator(".message.assistant .answer").inner_text().strip()  # then an answer


def test_a_document_search_is_shown_and_its_answer_cites_the_document(page, served):
    """With "Search documents" on, the demo searches the tenant's documents for a question it
    learned, opens the first result and answers with the line; the page shows both steps and the
    cited document, and the sources stay with the conversation on the server."""
    ask_with_tool(page, served, "Search documents", "When do I need a receipt?")
    steps = page.locator(".message.assistant .tool.web_search strong")
    assert steps.all_inner_texts() == ["Searched the documents", "Opened a document"]
    answer = page.locator(".message.assistant .answer").inner_text()
    assert "Receipts are required for every claim above 20 dollars." in answer
    sources = page.locator(".message.assistant .sources li")
    assert sources.all_inner_texts() == ["Expenses policy, line 5"]
    assert sources.first.get_attribute("title") == "inhouse://documents/doc_demo_expenses#L5-L5"
    page.locator("#conversations button.conv", has_text="When do I need").wait_for()
    page.reload()
    page.locator("#conversations button.conv", has_text="When do I need").first.click()
    expect(page.locator(".message.assistant .sources li")).to_have_text(["Expenses policy, line 5"])


def test_errors_are_shown_in_the_page_with_the_wait_of_a_429(page, served):
    s, keys, _ = served
    sign_in(page, s.url, keys["alice"])
    ask(page, "Send the results to jane.doe@example.com")  # the server refuses PII (a 400)
    error = page.locator("#chat-error")
    error.wait_for(state="visible")
    assert "EMAIL" in error.inner_text(), error.inner_text()
    assert page.locator(".message.assistant").count() == 0  # no empty answer left behind
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key", exact=True).wait_for()
    assert page.evaluate("sessionStorage.length") == 0  # the key left with the session
    sign_in(page, s.url, keys["limited"])  # 4 requests a minute: signing in takes some
    for i in range(4):
        ask(page, "Hello")
        page.locator(f"#chat-error:not([hidden]), #messages > :nth-child({2 * i + 2}) "
                     ".msg-actions").first.wait_for()
        if page.locator("#chat-error").is_visible():
            break
    text = page.locator("#chat-error").inner_text()
    assert "Too many requests" in text and "Try again in" in text, text


def test_an_auditor_verifies_the_log_reads_a_record_and_answers_export_and_erasure(page, served):
    s, keys, ids = served
    # alice chats (through the API, as the chat test does through the page)
    h = {"Authorization": f"Bearer {keys['alice']}"}
    r = httpx.post(f"{s.url}/v1/responses", headers=h, timeout=120,
                   json={"model": "inhouse-demo", "input": QUESTION, "temperature": 0})
    assert r.status_code == 200
    httpx.post(f"{s.url}/v1/ui/conversations", headers=h, json={
        "title": "kept", "messages": [{"role": "user", "content": QUESTION}]})
    sign_in(page, s.url, keys["auditor"])
    page.get_by_role("button", name="Governance").click()
    state = page.locator("#log-state")
    state.get_by_text("verified: every record").wait_for()
    page.get_by_role("button", name="Verify the log").click()
    state.get_by_text("verified: every record").wait_for()
    page.locator("#metrics dd").first.wait_for()
    assert "Generated tokens" in page.locator("#metrics").inner_text()
    # records, filtered by subject and key
    page.get_by_label("Subject").first.fill("alice")
    page.get_by_label("Key id").fill(ids["alice"])
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#records tbody tr")
    rows.first.wait_for()
    page.locator("#records-note", has_text="record(s)").wait_for()
    assert set(rows.locator("td:nth-child(3)").all_inner_texts()) == {"alice"}
    rows.filter(has_text="/v1/responses").first.click()
    detail = page.locator("#detail-json")
    detail.wait_for()
    assert ANSWER in detail.inner_text()
    for _ in range(20):  # a record's proof exists once a checkpoint seals it (every second here)
        page.get_by_role("button", name="Verify the log").click()
        state.get_by_text("verified: every record").wait_for()
        if page.locator("#log-state dd").nth(3).inner_text() == "0":
            break
        page.wait_for_timeout(500)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download proof").click()
    proof = json.loads(Path(dl.value.path()).read_text())
    assert proof["record_id"] in page.locator("#detail-title").inner_text()
    checked = check_offline(Path(dl.value.path()), s.log.parent / "audit.key")
    assert checked.exit_code == 0 and "valid" in checked.output, checked.output
    page.get_by_role("button", name="Replay").click()
    page.locator("#replay-result", has_text="Identical").wait_for(timeout=120_000)
    # export, then erasure with its confirmation
    page.locator("#s-subject").fill("alice")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export").click()
    exported = json.loads(Path(dl.value.path()).read_text())
    assert exported["subject"] == "alice" and exported["records"]
    assert [c["title"] for c in exported["conversations"]][-1] == "kept"
    page.get_by_role("button", name="Erase…").click()
    dialog = page.locator("#confirm-dialog")
    assert dialog.get_by_role("button", name="Confirm").is_disabled()
    dialog.get_by_role("textbox").fill("alic")
    assert dialog.get_by_role("button", name="Confirm").is_disabled()
    dialog.get_by_role("textbox").fill("alice")
    dialog.get_by_role("button", name="Confirm").click()
    page.locator("#subject-result", has_text="Erased alice").wait_for()
    assert httpx.get(f"{s.url}/v1/ui/conversations", headers=h).json()["data"] == []
    a = {"Authorization": f"Bearer {keys['auditor']}"}
    again = httpx.get(f"{s.url}/v1/audit/export", params={"subject": "alice"}, headers=a).json()
    assert again["content"] == {} and again["conversations"] == []
    page.get_by_role("button", name="Verify the log").click()
    state.get_by_text("verified: every record").wait_for()  # erasure keeps the log verifiable


def check_offline(proof: Path, signing_key: Path):
    """`inhouse audit check-proof` with the log's public key pinned: no server, no database."""
    from typer.testing import CliRunner

    from inhouse.cli import app as cli
    from inhouse.governance.audit_log import load_signing_key, public_key_pem

    pub = proof.with_suffix(".pub.pem")
    pub.write_bytes(public_key_pem(load_signing_key(signing_key).public_key()))
    return CliRunner().invoke(cli, ["audit", "check-proof", str(proof), "--public-key", str(pub)])


def test_a_user_key_cannot_open_the_console(page, served):
    s, keys, _ = served
    sign_in(page, s.url, keys["alice"])
    assert page.locator("#tab-console").is_hidden()
    page.goto(s.url + "/#console")
    page.locator("#chat-error", has_text="needs an auditor or admin key").wait_for()
    assert page.locator("#console").is_hidden()
    status = page.evaluate("""async (key) => (await fetch('/v1/audit/verify',
        {headers: {Authorization: 'Bearer ' + key}})).status""", keys["alice"])
    assert status == 403


def test_an_admin_creates_a_key_that_is_shown_once_and_revokes_it(page, served):
    s, keys, _ = served
    sign_in(page, s.url, keys["admin"])
    page.get_by_role("button", name="Governance").click()
    page.locator("#keys-card").wait_for()
    page.locator("#k-name").fill("night nurse")
    page.locator("#k-subject").fill("nurse-7")
    page.get_by_role("button", name="Create key").click()
    shown = page.locator("#new-key")
    shown.wait_for()
    new_key = shown.input_value()
    assert new_key.startswith("ih-")
    me = httpx.get(f"{s.url}/v1/ui/me", headers={"Authorization": f"Bearer {new_key}"}).json()
    assert me["subject"] == "nurse-7" and me["role"] == "user"
    page.get_by_role("button", name="Done").click()
    expect(shown).to_have_value("")  # gone from the page once closed
    row = page.locator("#keys tbody tr", has_text="night nurse")
    key_id = row.locator("td").first.inner_text()
    row.get_by_role("button", name="Revoke").click()
    page.locator("#confirm-input").fill(key_id)
    page.get_by_role("button", name="Confirm").click()
    page.locator("#keys tbody tr", has_text="night nurse").get_by_text("revoked").wait_for()
    assert httpx.get(f"{s.url}/v1/ui/me",
                     headers={"Authorization": f"Bearer {new_key}"}).status_code == 401


def test_the_page_works_with_the_network_cut(demo_cache, tmp_path):
    """Server and browser in a network namespace of their own (loopback only): the page, the
    chat and /docs work, and nothing tried to leave."""
    r = subprocess.run(["unshare", "--map-root-user", "--net", sys.executable, "-m",
                        "tests.webui_offline", str(demo_cache), str(tmp_path)],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "offline.json").read_text())
    assert report["interfaces"] == ["lo"]
    assert report["answer"] == ANSWER and report["docs_title"].startswith("inhouse")
    assert report["failed_requests"] == [] and report["foreign_requests"] == []


HOSTILE = ("**bold** <img src=\"https://evil.example/x.png\" onerror=\"window.pwned=1\">\n\n"
           "<script>window.pwned=2</script> [click me](javascript:window.pwned=3) "
           "<iframe src=\"/v1/ui/me\"></iframe> <a href=\"/\" onclick=\"window.pwned=4\">x</a>\n\n"
           "```python\nprint('<b>not html</b>')\n```")


def test_hostile_markdown_in_an_answer_runs_nothing_and_loads_nothing(page, served):
    """An answer (the model's, or a document's words it repeats) is Markdown from an untrusted
    source: scripts, handlers, javascript: links and frames are removed, and the page's policy
    would stop a remote image."""
    s, keys, _ = served
    h = {"Authorization": f"Bearer {keys['alice']}"}
    httpx.post(f"{s.url}/v1/ui/conversations", headers=h, json={
        "title": "<img src=x onerror=window.pwned=5>", "messages": [
            {"role": "user", "content": "<script>window.pwned=6</script>"},
            {"role": "assistant", "content": HOSTILE, "reasoning": "<b onclick=x>r</b>",
             "finish": "completed"}]})
    sign_in(page, s.url, keys["alice"])
    page.locator("#conversations button.conv", has_text="<img src=x").click()
    answer = page.locator(".message.assistant .answer")
    answer.locator("strong", has_text="bold").wait_for()
    html = answer.inner_html()
    assert "onerror=" not in html and "<script" not in html and 'href="javascript' not in html
    assert "<iframe" not in html and "onclick=" not in html
    img = answer.locator("img")  # the remote image: no address left to load
    assert img.get_attribute("src") is None and "evil.example" in img.get_attribute("alt")
    assert answer.locator("pre code").inner_text().strip() == "print('<b>not html</b>')"
    assert page.locator(".message.user .body").inner_text() == "<script>window.pwned=6</script>"
    answer.get_by_role("link", name="x").click(modifiers=[])  # its onclick is gone
    assert page.evaluate("window.pwned") is None


NAMELESS = """els => els.filter(el => el.offsetParent !== null && !(
    (el.labels && el.labels.length) || el.getAttribute('aria-label') ||
    (el.tagName === 'BUTTON' && el.textContent.trim()))).map(el => el.outerHTML)"""


def test_every_control_is_labelled_and_the_keyboard_reaches_the_chat(page, served):
    s, keys, _ = served
    sign_in(page, s.url, keys["admin"])
    assert page.locator("input, select, textarea, button").evaluate_all(NAMELESS) == []
    page.get_by_role("button", name="Governance").click()
    page.locator("#keys tbody tr").first.wait_for()
    assert page.locator("input, select, textarea, button").evaluate_all(NAMELESS) == []
    page.get_by_role("button", name="Chat").click()
    expect(page.locator("#prompt")).to_be_focused()  # the chat opens ready to type
    page.keyboard.press("Tab")
    expect(page.locator("#model")).to_be_focused()  # then its pickers, in order
    page.locator(".skip").focus()  # the skip link shows when focused, and lands on the page
    assert page.locator(".skip").bounding_box()["x"] >= 0
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()
