"""Paged KV caches (model/paged_cache.py), which the cuda backend's attention reads: the pages'
bookkeeping in plain Python, then the model and the engine on them against the CPU backend's
contiguous caches (the kernels run through Triton's interpreter here)."""

from __future__ import annotations

import pytest
import torch

from inhouse.config import preset
from inhouse.errors import InhouseError
from inhouse.model import load_model
from inhouse.model.paged_cache import PagedKVCache, PagedPools
from tests.conftest import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter


def _pools(full=64, sliding=16, page=4):
    return PagedPools(preset("tiny"), torch.float32, torch.device("cpu"), full, sliding, page)


def _write(cache: PagedKVCache, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
    """What the attention's write does: rows at positions start.. into their pages."""
    pool, index, pages, slots = cache._addresses(layer, torch.arange(start, start + k.shape[1]))
    pool.k[index][pages, :, slots] = k.transpose(0, 1)
    pool.v[index][pages, :, slots] = v.transpose(0, 1)


def test_pages_hold_what_was_written_and_sliding_layers_give_back_their_past():
    pools = _pools()
    cache = PagedKVCache(pools)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    for start, end in ((0, 30), (30, 31), (31, 40)):  # a prefill, then decode steps
        cache.ensure(end)
        for layer in range(4):
            _write(cache, layer, start, k[:, start:end], v[:, start:end])
        cache.num_tokens = end
    sliding, full = 0, 1  # tiny: layer 0 slides (window 16), layer 1 sees everything
    assert pools.where[sliding][0] and not pools.where[full][0]
    got = cache.layers[sliding].positions(0, 40)
    assert got is None  # given back behind the window
    assert cache.layers[full].positions(0, 40)[0].equal(k)
    assert cache.layers[full].positions(13, 29)[1].equal(v[:, 13:29])
    cache.ensure(40)  # the next query (position 40) sees 25..40: pages 6.. (4 positions each)
    assert all(p < 0 for p in cache.sliding[:6]) and all(p >= 0 for p in cache.sliding[6:])
    assert cache.layers[sliding].positions(25, 40)[0].equal(k[:, 25:40])
    assert len(pools.sliding.free) == 16 - len([p for p in cache.sliding if p >= 0])


def test_truncate_and_drop_give_pages_back_and_a_full_pool_is_an_error():
    pools = _pools(full=5, sliding=8)
    cache = PagedKVCache(pools)
    cache.make_room(17)  # 5 pages of 4
    assert len(pools.full.free) == 0
    cache.num_tokens = 17
    cache.truncate(9)  # 3 pages kept
    assert len(pools.full.free) == 2 and cache.num_tokens == 9
    other = PagedKVCache(pools)
    other.make_room(8)
    with pytest.raises(InhouseError, match="pool is full"):
        other.make_room(9)
    del cache, other  # dropped: every page back at once
    assert len(pools.full.free) == 5 and len(pools.sliding.free) == 8


def test_a_prefix_loads_into_pages():
    pools = _pools()
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 24, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    cache = PagedKVCache(pools)
    # the prefix cache's parts: full layers all 24 positions, sliding layers their last 16
    parts = [[(k[:, 8:16], v[:, 8:16]), (k[:, 16:], v[:, 16:])] if i % 2 == 0
             else [(k[:, :12], v[:, :12]), (k[:, 12:], v[:, 12:])] for i in range(4)]
    assert [pools.where[i][0] for i in range(4)] == [True, False, True, False]
    cache.load_prefix(parts, 24)
    assert cache.num_tokens == 24
    assert cache.layers[1].positions(0, 24)[0].equal(k)
    assert cache.layers[0].positions(9, 24)[1].equal(v[:, 9:24])


@pytest.fixture(scope="module")
def models(checkpoints):
    ours = load_model(checkpoints["hf"], backend="cuda")
    ours.use_paged_kv(PagedPools.sized(ours.config, ours.dtype, ours.device, 1 << 22, 4, 64))
    return ours, load_model(checkpoints["hf"], backend="cpu")


def test_the_model_on_pages_gives_the_contiguous_caches_logits(models, tiny_config):
    ours, cpu = models
    ids = random_ids(40, tiny_config.vocab_size)
    other = random_ids(7, tiny_config.vocab_size, seed=1)
    with torch.no_grad():
        paged, contiguous = ours.new_cache(), cpu.new_cache()
        assert isinstance(paged, PagedKVCache)
        for chunk in (ids[:37], ids[37:38], ids[38:]):  # prefill past the window, then decode
            got = ours(chunk, paged, last_only=True)
            assert torch.allclose(got, cpu(chunk, contiguous, last_only=True), atol=1e-4)
        # a batch: one sequence decoding, one prefilling, a third verifying two draft rows
        third, third_ref = ours.new_cache(), cpu.new_cache()
        ours(other[:5], third)
        cpu(other[:5], third_ref)
        feeds = [(ids[:1], paged), (other, ours.new_cache()), (other[5:6], third),
                 (other[6:7], third)]
        got = ours.forward_batch(feeds)
        want = [cpu(ids[:1], contiguous, last_only=True)[0], cpu(other, last_only=True)[0],
                cpu(other[5:6], third_ref, last_only=True)[0],
                cpu(other[6:7], third_ref, last_only=True)[0]]
        assert torch.allclose(got, torch.stack(want), atol=1e-4)
        assert third.num_tokens == 7
        third.truncate(6)  # the second draft row rejected
        assert torch.allclose(ours(other[6:7], third, last_only=True)[0], want[3], atol=1e-4)


def test_the_120b_holds_32k_tokens_for_several_users_on_one_80_gb_card():
    """Issue 21's capacity: the 120b's weights (experts packed) on an 80 GB card leave a KV budget
    (what `serve --device cuda` takes by default) whose pools page six users' 32k-token contexts,
    prefilled in chunks: the pools are built on the meta device, the pages really allocated."""
    from inhouse.model.summary import kv_budget_on_gpu, users_at_context, weight_bytes

    config, bf16, card = preset("gpt-oss-120b"), torch.bfloat16, 80 * 10**9
    weights = weight_bytes(config, "mxfp4", bf16)
    assert 60e9 < weights < 68e9  # 4.25 bits a weight for the experts: they stay packed
    users = users_at_context(config, bf16, card, 32768)
    assert users >= 4
    budget = kv_budget_on_gpu(card - weights, card)
    pools = PagedPools.sized(config, bf16, torch.device("meta"), budget, users, 2048)
    caches = [PagedKVCache(pools) for _ in range(users)]
    for start in range(0, 32768, 2048):  # the engine's chunked prefill, user after user
        for cache in caches:
            cache.make_room(2048)
            cache.num_tokens = start + 2048
    assert all(len(c.full) == 32768 // pools.page_size for c in caches)
    assert pools.full.num_pages - len(pools.full.free) == users * 2048  # 16-token pages
    with pytest.raises(InhouseError):  # and no more: the budget is what it says
        extra = PagedKVCache(pools)
        extra.make_room(pools.page_size * (len(pools.full.free) + 1))
