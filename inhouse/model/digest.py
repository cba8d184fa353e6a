"""sha256 over a checkpoint's files (config and weights), computed once and cached by path, size
and modification time: the model digest every audit record carries."""

from __future__ import annotations

import hashlib
import json

from inhouse.config import cache_root
from inhouse.model.weights import CheckpointInfo


def checkpoint_digest(info: CheckpointInfo) -> str:
    files = sorted({info.root / "config.json", *info.files})
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = cache_root() / "digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    cache[key] = digest
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache))
    return digest
