"""The gpt-oss model runtime: pure PyTorch, loading the real checkpoint layouts.

    from inhouse.model import load_model
    model = load_model(path, device="cpu", dtype=torch.float32)
    logits = model(token_ids)            # (T, vocab) for a fresh sequence
    cache = model.new_cache()            # incremental decoding
    logits = model(prompt_ids, cache=cache, last_only=True)
"""

from inhouse.model.kv_cache import KVCache
from inhouse.model.loader import load_model
from inhouse.model.transformer import Transformer
from inhouse.model.weights import CheckpointInfo, find_checkpoint

__all__ = ["CheckpointInfo", "KVCache", "Transformer", "find_checkpoint", "load_model"]
