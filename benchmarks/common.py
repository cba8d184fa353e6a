"""Helpers shared by the benchmark scripts: cache paths, memory readings, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from inhouse.config import cache_root
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def cache_dir() -> Path:
    return cache_root() / "bench"


def ensure_random_checkpoint(path: Path, preset: str, layout: str) -> None:
    """Build once, in a child process so that its memory does not count against the measurement."""
    if (path / "config.json").is_file():
        return
    print(f"building a random {preset} checkpoint ({layout}) in {path} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "inhouse.cli", "demo", "random", str(path),
                    "--preset", preset, "--layout", layout], check=True)


def memory() -> dict[str, int]:
    """Current RSS split into anonymous and file-backed bytes, and the peak RSS so far."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    fields["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return fields


def machine() -> dict[str, object]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def report(title: str, rows: list[tuple[str, str]], data: dict, name: str) -> Path:
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return out
