import json
import os
import signal
import sys
import time

import pytest
from typer.testing import CliRunner

from inhouse.cli import app

runner = CliRunner()


def _generate(*args):
    result = runner.invoke(app, ["generate", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_json_is_seeded_and_reports_usage(checkpoints):
    args = ["--model", str(checkpoints["hf"]), "--prompt", "Hello", "--max-tokens", "12",
            "--seed", "42", "--dtype", "float32"]
    a, b = _generate(*args), _generate(*args)
    assert a == {**b, "timings": a["timings"]}  # identical but for the timings
    assert a["seed"] == 42 and a["finish_reason"] in ("length", "stop", "tool_calls")
    assert a["usage"]["completion_tokens"] <= 12 and a["usage"]["prompt_tokens"] > 20
    assert set(a) >= {"reasoning", "content", "tool_calls", "warnings", "timings"}
    c = _generate(*args[:-3], "43", "--dtype", "float32")
    assert c["content"] != a["content"] or c["reasoning"] != a["reasoning"]
    mapped = _generate(*args, "--mmap")  # weights left in the file mapping: the same answer
    assert mapped == {**a, "timings": mapped["timings"]}


def test_generate_greedy_and_reasoning_effort_change_the_prompt(checkpoints):
    base = ["--model", str(checkpoints["hf"]), "--prompt", "Hi", "--max-tokens", "3",
            "--temperature", "0", "--dtype", "float32"]
    low = _generate(*base, "--reasoning", "low")
    high = _generate(*base, "--reasoning", "high")
    assert low["usage"]["prompt_tokens"] == high["usage"]["prompt_tokens"]  # one word differs


def test_generate_bad_model_is_one_line(tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "x", "--model", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.output.startswith("error: no such file or directory")


def test_chat_in_a_real_terminal(checkpoints):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    child = pexpect.spawn(sys.executable, ["-m", "inhouse.cli", "chat", "--model",
                                           str(checkpoints["hf"]), "--max-tokens", "16",
                                           "--dtype", "float32", "--seed", "1"],
                          env=env, encoding="utf-8", timeout=60)
    try:
        child.expect("you>")
        child.sendline("Hello there")
        child.expect(r"tokens/s, first token after")
        child.expect("you>")
        child.sendline("/effort high")
        child.expect("reasoning effort: high")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(checkpoints):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    # NOTE: Ctrl-C as a terminal gives it. A shell's background job (`make test &`) ignores
    # SIGINT, and an ignored signal stays ignored through exec: without this the chat would
    # never see the Ctrl-C (a fresh-clone run launched that way failed here twice).
    child = pexpect.spawn(sys.executable, ["-m", "inhouse.cli", "chat", "--model",
                                           str(checkpoints["hf"]), "--max-tokens", "100000",
                                           "--dtype", "float32"], env=env, encoding="utf-8",
                          timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("you>")
        child.sendline("Tell me a long story")
        child.expect("assistant>")
        time.sleep(1.0)  # the answer streams (100000 tokens would take minutes)
        child.sendintr()
        child.expect("stopped")
        child.expect("abort")  # the turn's summary line: the request was cancelled
        child.expect("you>")  # still chatting
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
