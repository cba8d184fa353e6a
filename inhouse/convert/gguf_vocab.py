"""The o200k vocabulary as GGUF's "gpt2" BPE tokenizer: token strings, types and merges.

tiktoken stores ranks only; GGUF (like HF tokenizer.json) wants byte-level token strings and the
list of merges. A token's merge is found by running BPE on its own bytes with only the ranks below
its own (the rank order *is* the merge order), which leaves exactly two parts. Special tokens (ids
199998 and up) take harmony's names and the "control" type.
"""

from __future__ import annotations

import base64
import functools

from inhouse.harmony.vocab import ensure_vocab, load_encoding, VOCAB_FILE

NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp's token types


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE strings)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def _text(token: bytes) -> str:
    table = _byte_chars()
    return "".join(table[b] for b in token)


def _ranks() -> dict[bytes, int]:
    ranks = {}
    for line in (ensure_vocab() / VOCAB_FILE).read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts BPE joins to make `token`, using only merges ranked before it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


@functools.lru_cache(maxsize=1)
def o200k_gguf_vocab() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, token types, merges) for ids 0 .. 201087 (the base ranks, then harmony's
    special tokens by name)."""
    ranks = _ranks()
    by_id = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_id] != list(range(len(by_id))):
        raise ValueError("o200k ranks are not 0..n-1")
    tokens = [_text(tok) for tok, _ in by_id]
    types = [NORMAL] * len(tokens)
    merges = []
    for tok, rank in by_id:
        if len(tok) > 1:
            pair = _merge_of(tok, rank, ranks)
            if pair is not None:
                merges.append(f"{_text(pair[0])} {_text(pair[1])}")
    encoding = load_encoding()
    for i in range(len(tokens), 201088):
        tokens.append(encoding.decode_utf8([i]))
        types.append(CONTROL)
    return tuple(tokens), tuple(types), tuple(merges)
