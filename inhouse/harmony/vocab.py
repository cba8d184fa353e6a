"""The o200k vocabulary for openai-harmony, offline, verified.

openai-harmony loads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (or its download cache) and
would otherwise fetch it from the network. inhouse never lets it: the `bpe-openai` wheel ships the
same file gzipped; we decompress it into our cache, check its sha256, and point harmony at it
before the first load.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import threading
from pathlib import Path

from inhouse.config import cache_root
from inhouse.errors import HarmonyUnavailable

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# tiktoken-rs names its cache entry after the sha1 of the download URL
RS_CACHE_NAME = "fb374d419588a4632f3f557e76b4b70aebbca790"
INSTALL_HINT = ("install the offline vocabulary with `pip install bpe-openai` (it ships "
                "o200k_base.tiktoken), or put the official o200k_base.tiktoken (sha256 "
                f"{VOCAB_SHA256[:12]}...) into $TIKTOKEN_ENCODINGS_BASE")


def cache_dir() -> Path:
    return cache_root() / "tiktoken"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bundled_vocab() -> bytes:
    # NOTE: locate the wheel's data without importing bpe_openai (its import builds tokenizers)
    try:
        spec = importlib.util.find_spec("bpe_openai")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("bpe_openai is not installed")
        gz = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{VOCAB_FILE}.gz"
        data = gz.read_bytes()
    except (ModuleNotFoundError, ValueError, FileNotFoundError, OSError) as e:
        raise HarmonyUnavailable(f"the o200k vocabulary is not available offline ({e}); "
                                 + INSTALL_HINT) from None
    return gzip.decompress(data)


# NOTE: prompts are rendered in worker threads, so the first renders can race here: one lock per
# process, and temporary files named per process and thread (several processes share a cache)
_LOCK = threading.RLock()


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.replace(target)


def ensure_vocab() -> Path:
    """Make sure a verified o200k_base.tiktoken exists; set the environment that harmony reads.
    Returns the directory. Never touches the network."""
    with _LOCK:
        return _ensure_vocab()


def _ensure_vocab() -> Path:
    preset = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if preset and (Path(preset) / VOCAB_FILE).is_file() and \
            _sha256(Path(preset) / VOCAB_FILE) == VOCAB_SHA256:
        directory = Path(preset)
    else:
        directory = cache_dir()
        target = directory / VOCAB_FILE
        if not target.is_file() or _sha256(target) != VOCAB_SHA256:
            data = _bundled_vocab()
            if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
                raise HarmonyUnavailable("the bundled o200k vocabulary has the wrong sha256; "
                                         + INSTALL_HINT)
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, data)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(directory)
    # Also fill harmony's download cache, so that no code path of it reaches for the network.
    rs_cache = directory / "rs-cache"
    rs_cache.mkdir(parents=True, exist_ok=True)
    cached = rs_cache / RS_CACHE_NAME
    if not cached.is_file() or cached.stat().st_size != (directory / VOCAB_FILE).stat().st_size:
        _write_atomic(cached, (directory / VOCAB_FILE).read_bytes())
    os.environ["TIKTOKEN_RS_CACHE_DIR"] = str(rs_cache)
    return directory


def load_encoding():
    """The harmony gpt-oss encoding (o200k_harmony), loaded offline once per process."""
    if _encoding is None:
        with _LOCK:
            if _encoding is None:
                _load_encoding()
    return _encoding


_encoding = None


def _load_encoding() -> None:
    global _encoding
    ensure_vocab()
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    except ModuleNotFoundError:
        raise HarmonyUnavailable("openai-harmony is not installed: `pip install openai-harmony`") from None
    try:
        _encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # noqa: BLE001 - harmony raises its own error types
        raise HarmonyUnavailable(f"openai-harmony could not load the o200k vocabulary ({e}); "
                                 + INSTALL_HINT) from None
