import os
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from inhouse.cli import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_on_the_demo_model_and_labels_it():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inhouse.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        card = models["data"][0]
        assert card["id"] == "inhouse-demo" and card["demo"] is True
        assert "meaningless" in card["description"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "inhouse-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "DEMO MODEL" in out and "Traceback" not in out


def test_a_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", os.environ["INHOUSE_CACHE"])  # an empty hub cache
    result = CliRunner().invoke(app, ["serve", "--model", "openai/gpt-oss-20b"])
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip() and "fetching" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch openai/gpt-oss-20b")
    assert "pass its path" in lines[0]


def test_replica_options_without_replicas_are_one_clear_line():
    for args in (["--max-replicas", "3"], ["--ray-address", "10.0.0.1:6379"],
                 ["--replicas", "2", "--max-replicas", "1"]):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 1, result.output
        lines = [l for l in result.output.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --"), result.output


def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path):
    import torch

    cases = [("tpu", "unknown device 'tpu'"), ("mps", "inhouse runs on cpu or cuda")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device"))
    for device, says in cases:
        for args in (["serve", "--device", device],
                     ["audit", "replay", "r1", "--model", str(tmp_path), "--device", device]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code != 0, result.output
            lines = [l for l in result.output.splitlines() if l.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: --device") and says in lines[0], \
                (args, result.output)
