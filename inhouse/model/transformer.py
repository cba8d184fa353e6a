"""The gpt-oss transformer. Module names follow the HF checkpoint, so its state dict *is* the HF
layout (`model.layers.N.self_attn.q_proj.weight`, ...); weights.py translates the other layouts."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from inhouse.config import ModelConfig
from inhouse.errors import InhouseError
from inhouse.kernels import backend as backends
from inhouse.kernels.backend import Seams
from inhouse.model.attention import attention, attention_reference
from inhouse.model.kv_cache import KVCache
from inhouse.model.paged_cache import PagedBatch, PagedKVCache, PagedPools
from inhouse.model.layers import (Linear, RMSNorm, RotaryEmbedding, apply_rotary,
                                  apply_rotary_reference, rmsnorm_reference, seam, through)
from inhouse.model.moe import MLP, moe_reference, route_reference


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a batched forward: rows row0..row0+num_tokens-1 of the flat batch
    are its tokens at positions start..start+num_tokens-1; `cache` is its KV cache (or None)."""

    row0: int
    num_tokens: int
    start: int
    cache: KVCache | None
    adapter: str | None = None  # LoRA adapter name (see lora.py), None for the base model


def one_call(fn, rows: int, groups: list[slice] | None) -> bool:
    """May fn take all groups' `rows` in one call? Yes for one group, and for a function whose
    rows never depend on each other (`rows_independent`): its weights are then read once per
    step, not once per sequence."""
    if groups is None or len(groups) == 1:
        return True
    independent = getattr(fn, "rows_independent", None)
    return independent is not None and independent(rows)


def by_rows(fn, x: torch.Tensor, groups: list[slice] | None) -> torch.Tensor:
    """fn over x's rows, group by group when `groups` is given (batch-invariant numerics: a
    matmul or reduction over a group's rows gives what that sequence alone would), in one call
    where `one_call` allows it."""
    if one_call(fn, x.shape[0], groups):
        return fn(x)
    return torch.cat([fn(x[g]) for g in groups])


def reference_seams() -> Seams:
    """The "reference" backend: the model's PyTorch references at every seam."""
    return Seams("reference", attention=attention_reference, experts=moe_reference,
                 rmsnorm=rmsnorm_reference, linear=nn.functional.linear,
                 rotary=apply_rotary_reference, route=route_reference)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, D)
        self.window = config.window(layer)
        self.scale = D ** -0.5
        self.q_proj = Linear(H, self.num_heads * D)
        self.k_proj = Linear(H, self.num_kv_heads * D)
        self.v_proj = Linear(H, self.num_kv_heads * D)
        self.o_proj = Linear(self.num_heads * D, H)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        self.lora = None  # an AttentionLoRA once adapters are attached (lora.attach)
        self.seams: Seams | None = None  # the backend's kernels (Transformer.use_backend)

    def _proj(self, name: str, x: torch.Tensor, groups: list[slice] | None) -> torch.Tensor:
        y = by_rows(getattr(self, name), x, groups)
        return y if self.lora is None else self.lora.delta(name, x, y)

    def _qkv(self, x: torch.Tensor, groups: list[slice] | None) -> list[torch.Tensor]:
        """q, k and v of x's rows: at decode one kernel call for the three (each row computed as
        if alone, so groups may share it); otherwise projection by projection."""
        names = ("q_proj", "k_proj", "v_proj")
        layers = [getattr(self, name) for name in names]
        together = None
        many = seam(self.seams, "linear_many")
        if many is not None and all(one_call(layer, x.shape[0], groups) for layer in layers):
            together = many(x, layers)
        if together is None:
            return [self._proj(name, x, groups) for name in names]
        if self.lora is None:
            return together
        return [self.lora.delta(name, x, y) for name, y in zip(names, together)]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                segments: list[Segment], groups: list[slice] | None = None,
                paged: PagedBatch | None = None) -> torch.Tensor:
        """x (N, H): the rows of all segments; cos/sin (N, D/2) at each row's position -> (N, H).
        Projections run over all rows at once (or per group); attention runs per segment against
        its own cache, or, over paged caches, for all segments in one call."""
        N = x.shape[0]
        q, k, v = self._qkv(x, groups)
        q = q.view(N, self.num_heads, self.head_dim)
        k = k.view(N, self.num_kv_heads, self.head_dim)
        v = v.view(N, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin, self.seams), apply_rotary(k, cos, sin, self.seams)
        if paged is not None:
            return self._proj("o_proj", self._paged(q, k, v, layer, paged).view(N, -1), groups)
        outs = []
        for seg in segments:
            rows = slice(seg.row0, seg.row0 + seg.num_tokens)
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (Hkv, T, D)
            k_start = seg.start
            if seg.cache is not None:
                ks, vs, k_start = seg.cache.layers[layer].extend(ks, vs)
            args = (q[rows], ks, vs, self.sinks, seg.start, k_start, self.window, self.scale)
            out = through(self.seams, "attention", *args)
            outs.append(out if out is not None else attention(*args))  # (T, Hq*D)
        return self._proj("o_proj", outs[0] if len(outs) == 1 else torch.cat(outs), groups)


    def _paged(self, q, k, v, layer: int, paged: PagedBatch) -> torch.Tensor:
        """The new keys and values written to their pages, then every segment's queries in one
        call of the backend's paged attention -> (N, Hq, D)."""
        attend = seam(self.seams, "paged_attention")
        if attend is None:
            raise InhouseError("paged KV caches are read by the cuda backend's kernels only")
        k_pages, v_pages, table, write = paged.layer(layer)
        k_pages[write, :, paged.write_slot] = k  # (N, Hkv, D) into (pages, Hkv, P, D)
        v_pages[write, :, paged.write_slot] = v
        return attend(q, k_pages, v_pages, self.sinks, table, paged.q_row0, paged.num_q,
                      paged.q_start, paged.num_k, self.window, self.scale, paged.max_q)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, experts_format: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, experts_format)

    def forward(self, x, cos, sin, layer, segments, groups, paged=None):
        h = by_rows(self.input_layernorm, x, groups)
        x = x + self.self_attn(h, cos, sin, layer, segments, groups, paged)
        return x + self.mlp(by_rows(self.post_attention_layernorm, x, groups), groups)


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, experts_format: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, experts_format)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """gpt-oss for causal LM. `model(ids)` -> logits (T, vocab) of a fresh sequence.

    With `cache`, the ids continue the cached sequence and the cache is extended.
    `last_only=True` computes the logits of the last position only (prefill).
    `dtype` is the compute dtype; norms and sinks stay fp32, packed experts stay uint8, and the
    embedding table stays in its stored dtype (rows are cast as they are looked up).
    """

    def __init__(self, config: ModelConfig, experts_format: str = "mxfp4",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if experts_format not in ("mxfp4", "dense"):
            raise ValueError(f"experts_format must be 'mxfp4' or 'dense', not {experts_format!r}")
        self.config = config
        self.experts_format = experts_format
        self.dtype = dtype
        self.model = GptOssModel(config, experts_format)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lora_routing = None  # set by lora.attach
        self.gradient_checkpointing = False  # recompute each layer in backward (training)
        self.step_plan = None  # the cpu backend's decode step's weight pointers, built at first use
        self.backend = "cpu"  # whose kernels run the seams (use_backend, below)
        self.seams: Seams | None = None  # the backend's whole-step seams (use_backend)
        self.pages: PagedPools | None = None  # new caches are paged when set (use_paged_kv)
        self.decode_graphs = None  # a cuda_graphs.DecodeGraphs: decode steps replayed whole
        self.register_load_state_dict_post_hook(Transformer._forget_step_plan)
        with torch.device("cpu"):  # NOTE: not on meta even when the rest is built there
            self.rotary = RotaryEmbedding(config)
        self.use_backend("cpu")  # load_model chooses again, for the device it loads onto

    def _forget_step_plan(self, *_) -> None:
        self.step_plan = None

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) builds its own step plan: addresses do not carry over."""
        return {**self.__dict__, "step_plan": None, "decode_graphs": None}

    def _apply(self, fn, *args, **kwargs):
        """nn.Module's (.to, .float, ...), which may move tensors: the step plan is dropped."""
        self._forget_step_plan()
        return super()._apply(fn, *args, **kwargs)

    def use_backend(self, name: str = "auto") -> str:
        """Plug backend `name` (kernels.backend: "auto", "cpu", "cuda", "reference") into every
        module with seams (attention, norms, router, experts, linears), once; returns the name
        chosen."""
        self.backend = backends.select(self.device, name)
        plugged = (reference_seams() if self.backend == "reference"
                   else backends.seams(self.backend))
        for module in self.modules():
            if hasattr(module, "seams"):
                module.seams = plugged
        return self.backend

    def verifies_rows_together(self) -> bool:
        """Do this model's decode steps read the weights once for several rows of one sequence
        (its backend's whole-step kernel takes them), so that speculative drafts pay?"""
        fn = seam(self.seams, "verifies_rows_together")
        return fn is not None and fn(self)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def use_paged_kv(self, pools: PagedPools | None) -> None:
        """Give new caches pages from `pools` (the cuda backend's attention reads them in one
        call for a whole batch); None: contiguous caches again."""
        if pools is not None and self.backend != "cuda":
            raise InhouseError("paged KV caches need the cuda backend")
        self.pages = pools
        self.decode_graphs = None  # they hold the old pools' tables

    def new_cache(self, max_tokens: int | None = None) -> KVCache | PagedKVCache:
        if self.pages is not None:
            return PagedKVCache(self.pages)
        return KVCache(self.config, self.dtype, self.device, max_tokens)

    def forward(self, token_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False, adapter: str | None = None) -> torch.Tensor:
        if token_ids.dim() != 1:
            raise InhouseError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        if (self.decode_graphs is not None and last_only and adapter is None
                and cache is not None):
            logits = self.decode_graphs.run([(token_ids, cache)], False)
            if logits is not None:
                return logits
        start = cache.num_tokens if cache is not None else 0
        x = self._hidden(token_ids, [Segment(0, token_ids.shape[0], start, cache, adapter)])
        if last_only:
            x = x[-1:]
        return self.lm_head(self.model.norm(x))  # (T, V)

    def hidden_states(self, token_ids: torch.Tensor,
                      lengths: list[int] | None = None) -> torch.Tensor:
        """Final-norm hidden states (T, H) of a fresh sequence, or of several concatenated ones
        of `lengths` (each attends only to itself): training applies `lm_head` only at the
        positions it scores, not over the whole vocabulary at every position."""
        lengths = lengths or [token_ids.shape[0]]
        starts = accumulate(lengths[:-1], initial=0)
        x = self._hidden(token_ids, [Segment(r, n, 0, None) for r, n in zip(starts, lengths)])
        return self.model.norm(x)

    def forward_batch(self, batch: list[tuple[torch.Tensor, KVCache]],
                      independent: bool = False,
                      adapters: list[str | None] | None = None) -> torch.Tensor:
        """Several sequences in one pass: each (ids (T_i,), cache) continues its cached sequence,
        with LoRA adapter adapters[i] (None: the base model). Returns the logits of each
        sequence's last new position, (len(batch), V).

        independent=False: row-wise ops run over all rows at once (fastest; a row's numerics may
        depend on the batch). independent=True: they run sequence by sequence, so each result is
        bit-identical to that sequence run alone, while routed experts are still decoded once for
        the whole batch (on CPU, most of a step's cost).

        A cache may come in several entries, which continue it in order: draft tokens verified
        one row each (every row computed as that token decoded alone would be). Its positions
        are then made room for first (`KVCache.make_room`), so that `truncate` can take back
        the rejected ones.
        """
        adapters = adapters or [None] * len(batch)
        if self.decode_graphs is not None and not any(adapters):  # a step replayed whole
            logits = self.decode_graphs.run(batch, independent)
            if logits is not None:
                return logits
        segments, row = [], 0
        fed: dict[int, int] = {}  # id(cache) -> positions given to it earlier in this batch
        for (ids, cache), adapter in zip(batch, adapters, strict=True):
            start = cache.num_tokens + fed.get(id(cache), 0)
            fed[id(cache)] = fed.get(id(cache), 0) + ids.shape[0]
            segments.append(Segment(row, ids.shape[0], start, cache, adapter))
            row += ids.shape[0]
        if len(fed) < len(batch):  # some cache comes more than once: room for all its rows
            for cache in {id(c): c for _, c in batch}.values():
                cache.make_room(fed[id(cache)])
        groups = [slice(s.row0, s.row0 + s.num_tokens) for s in segments] if independent else None
        x = self._hidden(torch.cat([ids for ids, _ in batch]), segments, groups)
        last = [s.row0 + s.num_tokens - 1 for s in segments]
        finals = [slice(i, i + 1) for i in range(len(last))] if independent else None
        return self.logits_of(x[last], finals)

    def logits_of(self, x: torch.Tensor, groups: list[slice] | None = None) -> torch.Tensor:
        """Final norm and unembedding of rows x (N, H) -> (N, V), group by group if given."""
        return by_rows(self.lm_head, by_rows(self.model.norm, x, groups), groups)

    def _hidden(self, token_ids: torch.Tensor, segments: list[Segment],
                groups: list[slice] | None = None) -> torch.Tensor:
        """Embedding and all layers for the flat rows of `segments`; advances their caches."""
        for seg in segments:
            if seg.start + seg.num_tokens > self.config.max_position_embeddings:
                raise InhouseError(f"sequence of {seg.start + seg.num_tokens} tokens exceeds the "
                                   f"context window of {self.config.max_position_embeddings}")
        positions = torch.cat([torch.arange(s.start, s.start + s.num_tokens) for s in segments])
        cos, sin = self.rotary.cos_sin(positions.to(self.device))
        x = self.model.embed_tokens(token_ids.to(self.device)).to(self.dtype)  # (N, H)
        routing = self.lora_routing
        if routing is not None and any(s.adapter for s in segments):
            routing.assignment = [(slice(s.row0, s.row0 + s.num_tokens), s.adapter)
                                  for s in segments]
        try:
            # decode: all layers in one call, where the backend has such a step and takes this one
            fused = through(self.seams, "decode_step", self, x, cos, sin, segments)
            if fused is None:
                paged = (PagedBatch.build(segments, self.device)
                         if all(isinstance(s.cache, PagedKVCache) for s in segments) else None)
                x = self._layers(x, cos, sin, segments, groups, paged)
            else:
                x = fused
        finally:
            if routing is not None:
                routing.assignment = None
        for seg in segments:
            if seg.cache is not None:
                seg.cache.num_tokens += seg.num_tokens
        return x

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment], groups: list[slice] | None,
                paged: PagedBatch | None = None) -> torch.Tensor:
        """x (N, H) through the decoder layers, module by module (decode_step.run is the same
        in one native call, where it applies)."""
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, i, segments, groups, paged,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, i, segments, groups, paged)
        return x
