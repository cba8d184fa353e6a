"""Sampling parameters and the per-request sampler: penalties, temperature, top-k, top-p, min-p.

Each request owns a `torch.Generator` seeded from its seed (drawn at random and recorded when the
request gives none), so its draws never depend on other requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inhouse.errors import InhouseError

MAX_TOP_LOGPROBS = 20
# NOTE: a temperature below this is greedy decoding (as in vLLM): dividing logits by 1e-38
# overflows to inf and the softmax to NaN. Documented in the README's sampling section.
GREEDY_BELOW = 1e-5


class InvalidRequest(InhouseError):
    """A request the engine refuses: bad sampling parameters, prompt too long, and so on."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_prompt_length(num_tokens: int, context: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if num_tokens >= context:
        raise InvalidRequest(f"the prompt has {num_tokens} tokens; the context window is "
                             f"{context} (over by {num_tokens - context + 1})", "messages")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; n: the sampled token's logprob and the top n
    adapter: str | None = None  # the LoRA adapter that generates (None: the base model)
    # a grammar the output must follow (llguidance's lark dialect, over token ids from the first
    # generated token); compiled by the engine's GrammarCompiler. Logprobs are then those of the
    # distribution actually sampled: the model's, restricted to what the grammar allows.
    grammar: str | None = None
    # prefix caching reuses keys and values only between requests of the same salt (the server
    # gives the tenant: one tenant's prompts are never found, nor timed, by another)
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0 <= self.temperature <= 2, "between 0 and 2"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "between 0 and 1"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "between -2 and 2"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "an integer in [0, 2**63)"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int)
                                                   and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"an integer between 0 and {MAX_TOP_LOGPROBS}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise InvalidRequest(f"'{name}' must be {what}, got {getattr(self, name)!r}", name)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def penalised(x: torch.Tensor, params: SamplingParams, output_ids) -> torch.Tensor:
    """Logits (V,) less the presence and frequency penalties of the tokens generated so far
    (on x's device, with no host sync)."""
    if params.has_penalties and output_ids:
        ids = torch.tensor(output_ids, device=x.device)
        counts = torch.zeros_like(x).index_add_(0, ids, torch.ones(len(output_ids), device=x.device))
        x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return x


def logprob_record(raw: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The drawn token's logprob and the `top` most likely, in the model's distribution before
    any processing; a token a grammar masked out (-inf) is no alternative (nor valid JSON)."""
    logprobs = torch.log_softmax(raw, dim=-1)
    pairs: tuple = ()
    if top:
        values, indices = torch.topk(logprobs, top)
        pairs = tuple((i, v) for i, v in zip(indices.tolist(), values.tolist())
                      if v != float("-inf"))
    return TokenLogprob(token, float(logprobs[token]), pairs)


def filtered_probs(raw: torch.Tensor, params: SamplingParams,
                   output_ids: list[int]) -> torch.Tensor:
    """The distribution `sample` draws from at a temperature (V,) fp32: penalties, temperature,
    top-k, softmax, min-p, top-p (not renormalised: the draw needs no normalisation)."""
    x = penalised(raw, params, output_ids) / params.temperature
    if params.top_k and params.top_k < x.shape[0]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of strictly more likely tokens
        cut = before >= params.top_p
        cut[0] = False  # the most likely token always stays, however small top_p is
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           output_ids: list[int]) -> tuple[int, TokenLogprob | None]:
    """logits (V,) of the next position -> (token id, its logprob record if asked for)."""
    raw = logits.float()
    if params.temperature < GREEDY_BELOW:
        token = int(penalised(raw, params, output_ids).argmax())
    else:
        token = int(torch.multinomial(filtered_probs(raw, params, output_ids), 1,
                                      generator=generator))
    if params.logprobs is None:
        return token, None
    return token, logprob_record(raw, token, params.logprobs)
