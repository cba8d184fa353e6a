"""The embedded demo models, built into the cache with no download:
- the trained demo (`inhouse demo build`: inhouse.train.demo), served by default once built;
- the random tiny checkpoint, served until then and used by smoke checks. Both are labelled."""

from __future__ import annotations

from pathlib import Path

from inhouse.config import cache_root, preset
from inhouse.convert.random_init import write_random_checkpoint

DEMO_VERSION = 5  # bump when the demo's data or recipe changes: a new cache entry is built
DEMO_LABEL = "demo (tiny random weights: output is meaningless)"
TRAINED_LABEL = ("demo (a tiny model trained on synthetic conversations: it knows a few "
                 "capitals and two tools, repeats a sentence back, looks up three questions in the "
                 "sample documents, calls python for a few sums and judges the sample policy; "
                 "nothing else)")


def demo_checkpoint() -> Path:
    """Path of the random demo checkpoint, built (seeded, ~50 MB, a few seconds) if missing."""
    path = cache_root() / "demo-random-tiny"
    if not (path / "config.json").is_file():
        write_random_checkpoint(path, preset("tiny"), "hf", seed=0)
    return path


def trained_demo_path() -> Path:
    return cache_root() / f"demo-trained-v{DEMO_VERSION}"


def demo_model() -> tuple[Path, str]:
    """(checkpoint, label) of the demo to serve: the trained one if built, else the random one."""
    trained = trained_demo_path()
    if (trained / "config.json").is_file():
        return trained, TRAINED_LABEL
    return demo_checkpoint(), DEMO_LABEL
