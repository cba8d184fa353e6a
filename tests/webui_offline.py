"""Run inside a network namespace of its own (`unshare --map-root-user --net`, loopback only):
serve the demo, open the page in chromium, sign in, chat, open /docs; write what happened to
DIR/offline.json. Used by test_webui.py; `python -m tests.webui_offline DEMO_CACHE DIR`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.webui_utils import CHROMIUM_ARGS, chromium_path, serve_demo


def interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def main(demo_cache: Path, work: Path) -> None:
    from playwright.sync_api import sync_playwright

    from inhouse.governance.keys import KeyStore

    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    _, key = KeyStore(f"sqlite:///{work / 'server.db'}").create("offline", "user")
    report: dict = {"interfaces": interfaces(), "failed_requests": [], "foreign_requests": []}
    with serve_demo(demo_cache, work) as s, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        # a request cut short by the next navigation is aborted, not failed
        page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
                else report["failed_requests"].append(f"{r.url} {r.failure}"))
        page.on("request", lambda r: None if r.url.startswith((s.url + "/", "data:", "blob:"))
                else report["foreign_requests"].append(r.url))
        page.goto(s.url + "/")
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Temperature").fill("0")  # the demo is only sure of itself greedy
        page.get_by_label("Message", exact=True).fill("What is the capital of France?")
        page.get_by_label("Message", exact=True).press("Enter")
        page.locator(".message.assistant .msg-actions").wait_for()
        report["answer"] = page.locator(".message.assistant .answer").inner_text().strip()
        page.goto(s.url + "/docs")
        page.locator(".swagger-ui .info .title").wait_for()
        report["docs_title"] = page.locator(".swagger-ui .info .title").inner_text()
        assert page.goto(s.url + "/redoc").status == 404  # ReDoc fetches its logo from a CDN
        browser.close()
    (work / "offline.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
