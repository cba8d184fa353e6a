import pytest
import torch

from inhouse.errors import InhouseError
from inhouse.model import load_model
from inhouse.model.generate import greedy
from tests.conftest import random_ids


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["hf"])


@pytest.mark.parametrize("layout", ["hf-sharded", "hf-bf16", "original"])
def test_every_layout_gives_the_same_logits(checkpoints, model, layout, tiny_config):
    ids = random_ids(40, tiny_config.vocab_size)
    with torch.inference_mode():
        want = model(ids)
        got = load_model(checkpoints[layout])(ids)
    assert got.shape == (40, tiny_config.vocab_size)
    # packed experts decode exactly; the dense variant differs only in summation order
    assert (got - want).abs().max() < 1e-5


def test_layout_detection(checkpoints):
    kinds = {k: (load_model(p).source.layout, load_model(p).source.experts_format)
             for k, p in checkpoints.items()}
    assert kinds == {"hf": ("hf", "mxfp4"), "hf-sharded": ("hf-sharded", "mxfp4"),
                     "hf-bf16": ("hf", "dense"), "original": ("original", "mxfp4")}
    assert len(load_model(checkpoints["hf-sharded"]).source.files) > 1


def test_original_layout_found_from_the_repo_root(checkpoints):
    # The hub repo holds original/ beside the HF files; given only the repo root with original/,
    # the loader finds it.
    root = checkpoints["original"].parent
    assert load_model(root).source.layout == "original"


@pytest.mark.parametrize("chunks", [[60], [1] * 30 + [30], [7, 9, 16, 1, 27], [17, 1, 1, 41]])
def test_cached_incremental_logits_equal_full_forward(model, tiny_config, chunks):
    ids = random_ids(sum(chunks), tiny_config.vocab_size, seed=3)  # 60 > window 16
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache()
        parts, at = [], 0
        for n in chunks:
            parts.append(model(ids[at:at + n], cache=cache))
            at += n
    assert cache.num_tokens == 60
    assert (torch.cat(parts) - full).abs().max() < 1e-4
    for i, layer in enumerate(cache.layers):
        if tiny_config.is_sliding(i):
            assert layer.length <= tiny_config.sliding_window  # sliding layers hold the window only
        else:
            assert layer.length == 60


def test_last_only_prefill(model, tiny_config):
    ids = random_ids(25, tiny_config.vocab_size)
    with torch.inference_mode():
        last = model(ids, cache=model.new_cache(), last_only=True)
        assert last.shape == (1, tiny_config.vocab_size)
        assert torch.allclose(last[0], model(ids)[-1], atol=1e-5)


def test_sliding_cache_memory_is_bounded(model, tiny_config):
    cache = model.new_cache()
    with torch.inference_mode():
        model(random_ids(20, tiny_config.vocab_size), cache=cache)
        sizes = []
        for t in range(60):
            model(torch.tensor([t]), cache=cache)
            sizes.append(sum(l.nbytes() for i, l in enumerate(cache.layers) if tiny_config.is_sliding(i)))
    assert max(sizes) == min(sizes)


def _window_reference(held_k, held_v, start, k, v, window):
    """What a sliding layer attends over and keeps: concatenate, keep the last `window`."""
    keys, vals = torch.cat([held_k, k], dim=1), torch.cat([held_v, v], dim=1)
    keep = min(keys.shape[1], window)
    return keys, vals, start, keys[:, -keep:], vals[:, -keep:], start + keys.shape[1] - keep


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_layer_hands_attention_what_concatenation_would(window):
    """The sliding layer's buffer keeps room after the held keys and moves them back only when it
    runs out: every step's keys, values and first position equal the plain concatenation's, for
    decode steps and chunks shorter and longer than the window."""
    from inhouse.model.kv_cache import LayerKVCache

    layer = LayerKVCache(2, 4, window, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(window)
    ref_k, ref_v, ref_start = torch.empty(2, 0, 4), torch.empty(2, 0, 4), 0
    sizes = [3, 1, 1, window + 7, 1] + [1] * (3 * window + 9) + [2, window, 1, 1]
    for T in sizes:
        k, v = torch.randn(2, T, 4, generator=g), torch.randn(2, T, 4, generator=g)
        want_k, want_v, want_first, ref_k, ref_v, ref_start = _window_reference(
            ref_k, ref_v, ref_start, k, v, window)
        got_k, got_v, got_first = layer.extend(k, v)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert got_first == want_first and layer.start == ref_start
        assert layer.length == ref_k.shape[1] <= window
    assert layer.k.shape[1] == window + max(1, window // 8)  # no larger than the window's room


def test_bf16_is_close_to_fp32(checkpoints, model, tiny_config):
    ids = random_ids(40, tiny_config.vocab_size)
    bf16 = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    with torch.inference_mode():
        a, b = model(ids), bf16(ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.25 * a.abs().max()
    assert (a.argmax(-1) == b.float().argmax(-1)).float().mean() > 0.7


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds t's data (Linux /proc/self/maps), or None for anonymous memory."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_mmap_keeps_weights_memory_mapped(checkpoints):
    """mmap=True: packed experts are views of the file's mapping, never copies; in bf16 so are the
    projections; the embedding table is never converted."""
    file = str(checkpoints["hf"] / "model.safetensors")
    fp32 = load_model(checkpoints["hf"], mmap=True)
    bf16 = load_model(checkpoints["hf"], dtype=torch.bfloat16, mmap=True)
    for m in (fp32, bf16):
        assert _mapped_file(m.model.layers[0].mlp.experts.gate_up_proj_blocks) == file
        assert _mapped_file(m.model.layers[3].mlp.experts.down_proj_scales) == file
        assert _mapped_file(m.model.embed_tokens.weight) == file
    assert _mapped_file(bf16.model.layers[0].self_attn.q_proj.weight) == file
    assert _mapped_file(fp32.model.layers[0].self_attn.q_proj.weight) is None  # converted


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_weights_are_read_into_memory_by_default(checkpoints, tiny_config, layout):
    """By default no weight stays in a file mapping (a decode step never waits for the disk), and
    the copies hold the same values as the mapped views (original/: q, k, v split from one
    tensor, their mapping released one after the other)."""
    mapped = load_model(checkpoints[layout], dtype=torch.bfloat16, mmap=True)
    resident = load_model(checkpoints[layout], dtype=torch.bfloat16)
    assert not any(_mapped_file(t) for t in resident.state_dict().values())
    for (name, a), (_, b) in zip(mapped.state_dict().items(), resident.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    ids = random_ids(24, tiny_config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(mapped(ids), resident(ids))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_weights_larger_than_free_memory_stay_mapped(checkpoints, monkeypatch, caplog):
    """Rather than copying weights into an OOM kill, load_model keeps them mapped and says so."""
    from inhouse.model import resident

    monkeypatch.setattr(resident, "available_memory", lambda: 1 << 20)  # 1 MiB free
    with caplog.at_level("WARNING", logger="inhouse.model.loader"):
        model = load_model(checkpoints["hf"], dtype=torch.bfloat16)
    file = str(checkpoints["hf"] / "model.safetensors")
    assert _mapped_file(model.model.layers[0].mlp.experts.gate_up_proj_blocks) == file
    assert "memory-mapped" in caplog.text and "GiB of memory available" in caplog.text


def test_resident_copy_survives_a_rewritten_file(tmp_path, checkpoints):
    """Read into memory, the model no longer depends on the file: rewriting the file's bytes
    under a loaded model changes a memory-mapped model's weights, not a default one's."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], path)
    resident = load_model(path, dtype=torch.bfloat16)
    mapped = load_model(path, dtype=torch.bfloat16, mmap=True)
    blocks = resident.model.layers[0].mlp.experts.gate_up_proj_blocks.clone()
    assert torch.equal(mapped.model.layers[0].mlp.experts.gate_up_proj_blocks, blocks)
    file = path / "model.safetensors"
    header = int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as f:  # every tensor byte after the header becomes 0x11
        f.seek(8 + header)
        f.write(b"\x11" * (file.stat().st_size - 8 - header))
    assert torch.equal(resident.model.layers[0].mlp.experts.gate_up_proj_blocks, blocks)
    assert (mapped.model.layers[0].mlp.experts.gate_up_proj_blocks == 0x11).all()


def test_greedy_stops_on_a_stop_id(model):
    first = greedy(model, [1, 2, 3], 5)
    assert greedy(model, [1, 2, 3], 5, stop_ids=[first[1]]) == first[:2]


def test_bad_token_input(model, tiny_config):
    with pytest.raises(InhouseError, match="1-D"):
        model(torch.zeros(2, 3, dtype=torch.long))
    long = model.config.replace(max_position_embeddings=8)
    model.config, saved = long, model.config
    try:
        with pytest.raises(InhouseError, match="exceeds the context window"):
            model(random_ids(9, tiny_config.vocab_size))
    finally:
        model.config = saved
