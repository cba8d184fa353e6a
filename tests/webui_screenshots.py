"""The README's screenshots of the web UI, taken from a real `inhouse serve` of the trained demo:
`python -m tests.webui_screenshots DEMO_CACHE docs/img` (writes webui-chat.png and
webui-console.png)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.webui_utils import CHROMIUM_ARGS, chromium_path, serve_demo


def main(demo_cache: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from inhouse.governance.keys import KeyStore

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, key = KeyStore(f"sqlite:///{work / 'server.db'}").create(
            "Dana (privacy officer)", "admin", tenant="clinic", subject="dana")
        with serve_demo(demo_cache, work) as s, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(60_000)
            page.goto(s.url + "/")
            page.get_by_label("API key", exact=True).fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_label("Temperature").fill("0")
            for question, python in (("What is the capital of France?", False),
                                     ("What is 12 times 11?", True)):
                page.get_by_label("Python").set_checked(python)
                page.get_by_label("Message", exact=True).fill(question)
                page.get_by_label("Message", exact=True).press("Enter")
                page.locator(f"#messages > :nth-child({4 if python else 2}) .msg-actions").wait_for()
            page.locator("details.reasoning summary").first.click()
            page.screenshot(path=str(out / "webui-chat.png"))
            page.get_by_role("button", name="Governance").click()
            page.locator("#log-state .ok").wait_for()
            page.locator("#records tbody tr").first.wait_for()
            page.screenshot(path=str(out / "webui-console.png"))
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
