"""Runs one scheduled step on the model: token ids in, next-token logits out."""

from __future__ import annotations

import torch

from inhouse.engine.scheduler import ScheduledChunk
from inhouse.model import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, mode: str, logits_on_host: bool = True) -> None:
        self.model = model
        self.mode = mode
        self.logits_on_host = logits_on_host

    @torch.inference_mode()
    def run(self, chunks: tuple[ScheduledChunk, ...]) -> list[torch.Tensor]:
        """Feed each chunk to its sequence's cache; return per chunk the logits (R, V) after its
        last token (R = 1; used only where the chunk completes the sequence's pending tokens),
        or, for a chunk with a draft, after the pending token and after each draft token
        (R = 1 + len(draft): each draft token is a row of its own, so each row's logits are the
        bits that token decoded alone would give). Logits are fp32, on the CPU where the engine
        samples on the host (else left on the model's device)."""
        feeds, adapters, rows = [], [], []
        for c in chunks:
            seq = c.seq
            if seq.cache is None:  # never larger than what the KV budget reserved for it
                seq.cache = self.model.new_cache(max_tokens=seq.reserve_tokens)
                if seq.prefix is not None:  # keys and values an earlier request computed
                    seq.cache.load_prefix(seq.prefix.layers, seq.prefix.num_tokens)
                    seq.prefix = None
            fed = c.num_tokens - len(c.draft)
            ids = seq.token_ids[seq.num_computed:seq.num_computed + fed]
            pieces = [ids] if not c.draft else [[t] for t in ids + list(c.draft)]
            feeds += [(torch.tensor(p), seq.cache) for p in pieces]
            adapters += [seq.params.adapter] * len(pieces)
            rows.append(len(pieces))
        if len(feeds) == 1:
            ids, cache = feeds[0]
            return [self._out(self.model(ids, cache=cache, last_only=True, adapter=adapters[0]))]
        # reproducible: row-wise ops per sequence, so numerics never depend on the batch
        logits = self.model.forward_batch(feeds, independent=self.mode == "reproducible",
                                          adapters=adapters)
        return list(torch.split(self._out(logits), rows))

    def _out(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.cpu() if self.logits_on_host else logits
