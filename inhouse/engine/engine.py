"""The generation engine: token ids in, token ids out. `step()` = schedule -> run -> update."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

from inhouse.config import EngineConfig
from inhouse.engine.constraint import GrammarCompiler
from inhouse.engine import device_sampler
from inhouse.engine.device_sampler import Draw, DrawRequest
from inhouse.engine.draft import PromptLookup
from inhouse.engine.kv_manager import KVBlockManager, KVLayout
from inhouse.engine.prefix_cache import PrefixCache, kv_nbytes
from inhouse.engine.request import RequestOutput, Sequence, Status
from inhouse.engine.runner import ModelRunner
from inhouse.engine.sampling import (InvalidRequest, SamplingParams, check_prompt_length,
                                     sample)
from inhouse.engine.scheduler import ScheduledChunk, Scheduler
from inhouse.model import Transformer
from inhouse.model.lora import adapter_names
from inhouse.model.cuda_graphs import graphs_for
from inhouse.model.paged_cache import PagedPools

log = logging.getLogger("inhouse.engine")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    finished_per_s: float = 0.0  # requests finished per second lately (0: none measured)
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache, ever
    prefix_hit_tokens: int = 0  # of which were reused
    prefix_cache_bytes: int = 0  # the cached blocks' keys and values now
    num_replicas: int = 1  # engines behind this client (Ray Serve replicas heard from lately)
    num_replicas_busy: int = 0  # of which have requests running or waiting


class LLMEngine:
    """Single-threaded core; `AsyncEngine` drives it from a background thread."""

    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(),
                 grammars: GrammarCompiler | None = None) -> None:
        self.model = model
        self.config = config
        self.grammars = grammars
        mc = model.config
        sliding = sum(mc.is_sliding(i) for i in range(mc.num_hidden_layers))
        layout = KVLayout(mc.num_hidden_layers - sliding, sliding, mc.sliding_window,
                          config.block_size,
                          2 * mc.num_key_value_heads * mc.head_dim * model.dtype.itemsize)
        prefix = (PrefixCache(config.block_size, [mc.window(i) for i in range(mc.num_hidden_layers)])
                  if config.prefix_caching else None)
        self.kv = KVBlockManager(layout, config.kv_budget_bytes, prefix)
        self.scheduler = Scheduler(config, self.kv)
        if model.backend == "cuda" and model.pages is None:  # its attention reads pages
            model.use_paged_kv(PagedPools.sized(mc, model.dtype, model.device,
                                                config.kv_budget_bytes, config.max_num_seqs,
                                                config.max_num_batched_tokens))
            if config.cuda_graphs:
                model.decode_graphs = graphs_for(model)
        # the cuda backend draws on the device: its logits never come to the host
        self.draws_on_device = model.backend == "cuda"
        self.runner = ModelRunner(model, config.mode, logits_on_host=not self.draws_on_device)
        self._graph_failure_logged = False
        self._seqs: dict[str, Sequence] = {}
        # drafts only where verifying them shares the weights' reads (else they cost a step each)
        self.drafting = config.num_draft_tokens > 0 and model.verifies_rows_together()
        self.num_draft_tokens = 0  # draft tokens verified, ever
        self.num_draft_kept = 0  # of which were what was sampled

    # ---- requests --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; returns the seed it samples with. Raises InvalidRequest or QueueFull."""
        if request_id in self._seqs:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        context = self.model.config.max_position_embeddings
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        check_prompt_length(len(prompt_ids), context)
        if params.adapter is not None and params.adapter not in adapter_names(self.model):
            raise InvalidRequest(f"no adapter named {params.adapter!r} is loaded", "model")
        reserve = min(len(prompt_ids) + params.max_tokens, context)
        if not self.kv.fits_at_all(reserve):
            raise InvalidRequest(f"the request needs KV memory for {reserve} tokens, more than the "
                                 "whole KV budget; lower max_tokens or raise --kv-budget",
                                 "max_tokens")
        matcher = None
        if params.grammar is not None:
            if self.grammars is None:
                raise InvalidRequest("this engine was built without a grammar backend",
                                     "response_format")
            try:
                matcher = self.grammars.new_matcher(params.grammar)
            except ValueError as e:
                raise InvalidRequest(f"the grammar cannot be compiled: {e}",
                                     "response_format") from None
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id, list(prompt_ids), params, seed, reserve)
        seq.matcher = matcher
        seq.generator = torch.Generator().manual_seed(seed)
        if self.drafting:
            seq.drafter = PromptLookup()
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        log.debug("request %s queued: %d prompt tokens, max %d", request_id, len(prompt_ids),
                  params.max_tokens)
        return seed

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return None
        return self._finish(seq, "abort", ())

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every queued and running request with finish_reason "error" (frees their KV)."""
        return [self._finish(seq, "error", (), error=error) for seq in list(self._seqs.values())]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        p = self.kv.prefix
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting),
                           self.kv.num_used, self.kv.num_blocks,
                           prefix_queried_tokens=p.num_queried_tokens if p else 0,
                           prefix_hit_tokens=p.num_hit_tokens if p else 0,
                           prefix_cache_bytes=p.nbytes if p else 0,
                           num_replicas_busy=int(self.scheduler.has_work()))

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        try:
            rows: list = self.runner.run(plan.chunks)
        except Exception:  # noqa: BLE001 - a failed step fails only the requests that fail alone
            log.exception("engine step of %d sequences failed", len(plan.chunks))
            rows = self._run_alone(plan.chunks)
        graphs = getattr(self.model, "decode_graphs", None)
        if graphs is not None and graphs.failure and not self._graph_failure_logged:
            log.warning("CUDA graph capture failed (%s); decode steps run launch by launch",
                        graphs.failure)
            self._graph_failure_logged = True
        outputs: list = []
        decodes: list[tuple[int, Sequence, torch.Tensor]] = []  # (place in outputs, seq, row)
        for chunk, row in zip(plan.chunks, rows):
            seq = chunk.seq
            if isinstance(row, Exception):
                outputs.append(self._finish(seq, "error", (), error=_describe(row)))
                continue
            if chunk.draft:
                outputs.append(self._accept(chunk, row))
                continue
            seq.num_computed += chunk.num_tokens
            self._capture(seq)
            if seq.num_pending:  # mid-prompt: nothing to sample yet
                continue
            decodes.append((len(outputs), seq, row[-1]))
            outputs.append(None)
        drawn = self._draw([(seq, row) for _, seq, row in decodes])  # every row at once
        for (place, seq, _), result in zip(decodes, drawn):
            new_ids: list[int] = []
            new_lp: list = []
            done = self._take(seq, result, new_ids, new_lp)
            outputs[place] = done or self._output(seq, tuple(new_ids), tuple(new_lp))
        return outputs

    def _take(self, seq: Sequence, result, new_ids: list[int],
              new_lp: list) -> RequestOutput | None:
        """Add a drawn token (and its logprob) to the sequence and to new_ids/new_lp; the
        finishing output where that ends the sequence (its draw failed: `result` is the
        exception; a stop token, max_tokens, the context), else None."""
        if isinstance(result, Exception):
            log.warning("request %s failed at sampling: %s", seq.request_id, _describe(result))
            return self._finish(seq, "error", tuple(new_ids), tuple(new_lp), _describe(result))
        token, lp = result
        seq.output_ids.append(token)
        new_ids.append(token)
        if lp is not None:
            new_lp.append(lp)
            seq.logprobs.append(lp)
        reason = self._finish_reason(seq, token)
        return self._finish(seq, reason, tuple(new_ids), tuple(new_lp)) if reason else None

    def _accept(self, chunk: ScheduledChunk, rows: torch.Tensor) -> RequestOutput:
        """A verified draft: sample from the row after the pending token, then from the row
        after each draft token for as long as the draft guessed what was sampled. The sampler
        and the grammar see exactly the tokens and logits of decoding without the draft (each
        row is the bits of that token alone), so the output is the same; the positions of the
        tokens not kept are taken back from the cache. `rows` may have fewer rows than the
        chunk (the step failed and the sequence was recomputed alone, without its draft)."""
        seq = chunk.seq
        base = seq.num_computed  # the pending token's position
        new_ids: list[int] = []
        new_lp: list = []
        for j in range(rows.shape[0]):  # each draw waits for the one before (the grammar)
            done = self._take(seq, self._draw([(seq, rows[j])])[0], new_ids, new_lp)
            if done:
                return done
            if j >= len(chunk.draft) or new_ids[-1] != chunk.draft[j]:
                break
        kept = len(new_ids) - 1  # draft tokens kept
        self.num_draft_tokens += len(chunk.draft)
        self.num_draft_kept += kept
        # NOTE: on an MoE every draft row reads experts of its own, so a long draft pays only
        # when nearly all of it is kept: drafts start at one token and grow by one while whole
        # drafts are kept; a miss goes back to what was kept, and misses in a row back off.
        whole = kept == len(chunk.draft)
        seq.draft_size = (min(kept + 1, self.config.num_draft_tokens) if whole else max(1, kept))
        seq.draft_misses = 0 if kept else seq.draft_misses + 1
        seq.draft_wait = min(2 ** seq.draft_misses, 64) if seq.draft_misses else 0
        seq.num_computed = base + len(new_ids)
        if seq.cache.num_tokens > seq.num_computed:
            seq.cache.truncate(seq.num_computed)
        self._capture(seq)
        return self._output(seq, tuple(new_ids), tuple(new_lp))

    def _draw(self, pairs: list[tuple[Sequence, torch.Tensor]]) -> list:
        """Per (sequence, logits row): (token, its logprob record or None), or the exception
        that fails that sequence alone. The grammar's mask is applied and the token consumed.
        On the cuda backend every row is drawn on the device at once (device_sampler); else on
        the host, row by row, with each request's generator."""
        masks = [_attempt(self._allowed, seq, row.shape[0]) for seq, row in pairs]
        results: list = [m if isinstance(m, Exception) else None for m in masks]
        todo = [i for i in range(len(pairs)) if results[i] is None]
        if self.draws_on_device:
            for i, d in zip(todo, self._draw_on_device(pairs, masks, todo)):
                results[i] = d
        else:
            for i in todo:
                results[i] = _attempt(self._draw_on_host, pairs[i][0], pairs[i][1], masks[i])
        for i, (seq, _) in enumerate(pairs):
            if seq.matcher is not None and not isinstance(results[i], Exception):
                results[i] = _attempt(self._consume, seq, results[i])
        return results

    @staticmethod
    def _consume(seq: Sequence, drawn: tuple[int, object]) -> tuple[int, object]:
        """The drawn token fed to the sequence's grammar (which must take what it allowed)."""
        if not seq.matcher.consume(drawn[0]):
            raise RuntimeError(f"the grammar refused token {drawn[0]} it had allowed")
        return drawn

    def _allowed(self, seq: Sequence, vocab: int):
        """The grammar's mask of the tokens allowed next, (vocab,) bool, or None (no grammar)."""
        if seq.matcher is None:
            return None
        remaining = min(seq.params.max_tokens - len(seq.output_ids),
                        self.model.config.max_position_embeddings - seq.num_tokens)
        allowed = seq.matcher.allowed(remaining)[:vocab]
        if not allowed.any():
            raise RuntimeError("the grammar allows no next token")
        return allowed

    @staticmethod
    def _draw_on_host(seq: Sequence, row: torch.Tensor, allowed) -> tuple[int, object]:
        if bool(torch.isnan(row).any()) or bool(torch.isposinf(row).any()):
            raise FloatingPointError("the model produced non-finite logits")
        if allowed is not None:
            row = row.masked_fill(~torch.from_numpy(allowed), float("-inf"))
        return sample(row, seq.params, seq.generator, seq.output_ids)

    def _draw_on_device(self, pairs, masks, todo: list[int]) -> list:
        """The rows `todo` drawn in one launch; where that fails, each alone (so that only a
        row that fails by itself fails)."""
        def request(i):
            seq, row = pairs[i]
            return DrawRequest(row, seq.params, seq.seed, len(seq.output_ids),
                               tuple(seq.output_ids) if seq.params.has_penalties else (),
                               masks[i])

        def result(d: Draw):
            if not d.is_finite:
                return FloatingPointError("the model produced non-finite logits")
            return d.token, d.logprob

        try:
            return [result(d) for d in device_sampler.draw([request(i) for i in todo])]
        except Exception:  # noqa: BLE001 - retried row by row below
            log.exception("drawing %d rows on the device failed", len(todo))
        return [_attempt(lambda i: result(device_sampler.draw([request(i)])[0]), i) for i in todo]

    def _run_alone(self, chunks) -> list:
        """After a batched step failed: each sequence recomputed by itself from its own tokens
        (the failed step may have written some layers' caches), so that only a sequence that
        fails alone fails. Logits (V,) per chunk, or the exception it raised."""
        rows: list = []
        for c in chunks:
            try:  # a draft is dropped: only the pending token is decoded
                upto = c.seq.num_computed + c.num_tokens - len(c.draft)
                rows.append(self._recompute(c.seq, upto))
            except Exception as e:  # noqa: BLE001 - reported on this sequence alone
                log.exception("request %s fails alone", c.seq.request_id)
                rows.append(e)
        return rows

    def _recompute(self, seq: Sequence, upto: int) -> torch.Tensor:
        """A fresh cache filled with token_ids[:upto] in the schedule the sequence had alone
        (prompt chunks of `prefill_chunk`, then one token at a time), so that reproducible mode
        gives the same bits; returns the logits after token upto - 1. `num_computed` is left as
        before the step, for step()'s update."""
        before = seq.num_computed
        seq.cache, seq.num_computed, seq.prefix = None, 0, None
        logits = None
        prompt = len(seq.prompt_ids)
        while seq.num_computed < upto:
            if seq.num_computed < prompt:
                n = min(self.config.prefill_chunk, prompt - seq.num_computed, upto - seq.num_computed)
            else:
                n = 1
            logits = self.runner.run((ScheduledChunk(seq, n),))[0]
            seq.num_computed += n
        seq.num_computed = before
        return logits

    def _capture(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache. Reproducible mode
        offers only blocks of the prompt's whole fixed chunks: only their keys and values are
        the bits a fresh request computes (decoded positions take another arithmetic)."""
        prefix = self.kv.prefix
        if prefix is None or seq.cache is None or not seq.is_capturing:
            return
        limit = seq.num_computed
        if self.config.mode == "reproducible":
            chunk = self.config.prefill_chunk
            limit = min(limit, len(seq.prompt_ids) // chunk * chunk)
        B = prefix.block_size
        while seq.num_captured + B <= limit:
            start, end = seq.num_captured, seq.num_captured + B
            key = prefix.next_key(seq.chain_key, seq.token_ids[start:end])
            if not prefix.is_complete(key):
                layers = [layer.positions(start, end) for layer in seq.cache.layers]
                if not self.kv.room_for_cache(kv_nbytes(layers), seq.cache_tick):
                    return
                if not prefix.insert(key, seq.chain_key if start else None, layers):
                    seq.is_capturing = False
                    return
            seq.chain_key, seq.num_captured = key, end

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids:
            return "length" if seq.matcher is not None and seq.matcher.is_cut else "stop"
        if len(seq.output_ids) >= seq.params.max_tokens:
            return "length"
        if seq.num_tokens >= self.model.config.max_position_embeddings:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, new_ids: tuple[int, ...], new_lp=(),
                error: str | None = None) -> RequestOutput:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.remove(seq)
        seq.cache = None  # frees the KV tensors
        seq.matcher = None
        self._seqs.pop(seq.request_id, None)
        return self._output(seq, new_ids, new_lp, error)

    @staticmethod
    def _output(seq: Sequence, new_ids, new_lp, error: str | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, tuple(new_ids), tuple(new_lp),
                             seq.status == Status.FINISHED, seq.finish_reason,
                             len(seq.prompt_ids), len(seq.output_ids), seq.seed, error,
                             seq.queue_wait_s, seq.num_cached)


def _attempt(fn, *args):
    """fn(*args), or the exception it raised (it then fails one request, not the step)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported on that request alone
        return e


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
