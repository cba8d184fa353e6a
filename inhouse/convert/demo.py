"""The embedded demo checkpoint: tiny, random, built once into the cache. Until the trained demo
model exists, this is what runs when no model is given, and it is labelled as such."""

from __future__ import annotations

from pathlib import Path

from inhouse.config import cache_root, preset
from inhouse.convert.random_init import write_random_checkpoint

DEMO_LABEL = "demo (tiny random weights: output is meaningless)"


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint, built (seeded, ~50 MB, a few seconds) if missing."""
    path = cache_root() / "demo-random-tiny"
    if not (path / "config.json").is_file():
        write_random_checkpoint(path, preset("tiny"), "hf", seed=0)
    return path
