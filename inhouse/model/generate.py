"""Reference greedy decoding with the KV cache: the plain loop the engine is checked against."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from inhouse.model.transformer import Transformer


@torch.inference_mode()
def greedy_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                  stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield greedily decoded ids one at a time: prefill once, then one cached step per token.
    Stops after a stop id (which is yielded) or `max_new_tokens`."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    stops = set(stop_ids)
    cache = model.new_cache()
    logits = model(torch.tensor(prompt_ids, dtype=torch.long), cache=cache, last_only=True)
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        yield token
        if token in stops:
            return
        logits = model(torch.tensor([token], dtype=torch.long), cache=cache)


def greedy(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
           stop_ids: Iterable[int] = ()) -> list[int]:
    return list(greedy_tokens(model, prompt_ids, max_new_tokens, stop_ids))
