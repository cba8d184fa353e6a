"""benchmarks/gpu.py is run by whoever is lent a GPU, once, with no time to debug it: its --smoke
mode (the tiny shape through Triton's interpreter on CPU) runs the same code here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_end_to_end_in_smoke_mode(monkeypatch):
    from benchmarks import gpu

    out = ROOT / "benchmarks" / "results" / "gpu-smoke.json"
    out.unlink(missing_ok=True)
    monkeypatch.setattr(sys, "argv", ["benchmarks/gpu.py", "--smoke"])
    gpu.main()
    data = json.loads(out.read_text())
    decode = [x for x in data["results"] if "users" in x and "kind" not in x]
    assert {(x["mode"], x["users"]) for x in decode} == {("reproducible", 2)}
    # on CPU the engine runs no graphs (they need a CUDA device): the smoke has no x1 row
    assert all(x["decode_tokens"] > 0 and x["tokens_per_s"] > 0 for x in decode)
    assert [x["kind"] for x in data["results"] if "kind" in x] == ["prefill", "long_context"]
    (long,) = [x for x in data["results"] if x.get("kind") == "long_context"]
    assert long["users"] == 2 and long["prompt_tokens"] == 24 and long["decode_tokens"] > 0
