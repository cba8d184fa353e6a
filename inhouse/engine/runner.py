"""Runs one scheduled step on the model: token ids in, next-token logits out."""

from __future__ import annotations

import torch

from inhouse.engine.scheduler import ScheduledChunk
from inhouse.model import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, mode: str) -> None:
        self.model = model
        self.mode = mode

    @torch.inference_mode()
    def run(self, chunks: tuple[ScheduledChunk, ...]) -> list[torch.Tensor]:
        """Feed each chunk to its sequence's cache; return the logits (V,) after each chunk's
        last token (used only where the chunk completes the sequence's pending tokens).
        Logits come back as fp32 on the CPU, where seeded sampling runs on any device."""
        feeds = []
        for c in chunks:
            seq = c.seq
            if seq.cache is None:  # never larger than what the KV budget reserved for it
                seq.cache = self.model.new_cache(max_tokens=seq.reserve_tokens)
                if seq.prefix is not None:  # keys and values an earlier request computed
                    seq.cache.load_prefix(seq.prefix.layers, seq.prefix.num_tokens)
                    seq.prefix = None
            ids = torch.tensor(seq.token_ids[seq.num_computed:seq.num_computed + c.num_tokens])
            feeds.append((ids, seq.cache))
        if len(feeds) == 1:
            ids, cache = feeds[0]
            return [self.model(ids, cache=cache, last_only=True,
                               adapter=chunks[0].seq.params.adapter)[0].float().cpu()]
        # reproducible: row-wise ops per sequence, so numerics never depend on the batch
        logits = self.model.forward_batch(feeds, independent=self.mode == "reproducible",
                                          adapters=[c.seq.params.adapter for c in chunks])
        return list(logits.float().cpu())
