"""Shared fixtures: tiny random checkpoints in every real layout, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inhouse.config import ModelConfig, preset
from inhouse.convert import LAYOUTS, write_random_checkpoint

SEED = 1234

# The cuda backend's Triton kernels run on CPU tensors through Triton's interpreter where there is
# no GPU (tests/test_cuda_kernels.py); triton reads this when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the oracle tests (ours and the oracles): cpu or cuda")


@pytest.fixture(scope="session")
def device(request) -> str:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda, but no CUDA device is available")
    return name


def pytest_configure(config):
    # CI runs a fixed set of examples (reproducible runs); local runs keep exploring at random.
    from hypothesis import settings
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
    # A fresh cache per session, like a fresh machine (the tokenizer vocabulary is set up from the
    # bpe-openai wheel into it); an explicit INHOUSE_CACHE wins.
    if "INHOUSE_CACHE" not in os.environ:
        import tempfile
        os.environ["INHOUSE_CACHE"] = tempfile.mkdtemp(prefix="inhouse-test-cache-")
        for k in [k for k in os.environ if k.startswith("TIKTOKEN")]:
            del os.environ[k]


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    """4 layers (2 sliding, window 16), 8 experts top-4, hidden 64, GQA 4/2, the real vocabulary."""
    return preset("tiny")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny_config) -> dict[str, Path]:
    """layout -> directory to load; the same weights (same seed) in every layout."""
    base = tmp_path_factory.mktemp("ckpt")
    # small shards so that the sharded layout really has several files
    return {layout: write_random_checkpoint(base / layout, tiny_config, layout, seed=SEED,
                                            max_shard_bytes=8 << 20)
            for layout in LAYOUTS}


@pytest.fixture(scope="session")
def int8_checkpoint(checkpoints, tmp_path_factory) -> Path:
    """The hf checkpoint converted with --quantize int8 (int8 attention and unembedding)."""
    from inhouse.convert.convert import convert

    return convert(checkpoints["hf"], tmp_path_factory.mktemp("int8") / "q", "hf", quantize="int8")


@pytest.fixture(scope="session")
def window128_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The real 128-token window, top-2 of 4 experts, hidden 128, MQA (1 kv head)."""
    base = tmp_path_factory.mktemp("ckpt128")
    cfg = preset("tiny-window128")
    return {layout: write_random_checkpoint(base / layout, cfg, layout, seed=SEED + 1)
            for layout in ("hf", "original")}


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def random_moe_layer(dtype: torch.dtype, seed: int = 0, num_experts: int = 6,
                     experts_per_token: int = 3):
    """A MoE layer (router + MXFP4 experts, hidden 64, intermediate 96) with random packed
    weights (scales 118-127) and random parameters in dtype."""
    import dataclasses

    from inhouse.model.moe import MLP

    config = dataclasses.replace(preset("tiny-window128"), hidden_size=64,
                                 num_experts=num_experts, experts_per_token=experts_per_token)
    torch.manual_seed(seed)
    mlp = MLP(config, "mxfp4")
    for name, b in mlp.named_buffers():
        lo, hi = (118, 128) if "scales" in name else (0, 256)
        b.copy_(torch.randint(lo, hi, b.shape, dtype=torch.uint8))
    for p in mlp.parameters():
        p.data = torch.randn(p.shape).to(dtype)
    return mlp


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """An INHOUSE_CACHE holding the trained demo model, built once per session by the CLI
    (`inhouse demo build`, about three minutes on 2 cores): the demo, structured-output, web UI
    and Ray tests share it.
    NOTE: built in this process, in turn. Built beside the rest of the suite in a background
    process it made the run no shorter (10:37 niced, 19:52 not: the suite is CPU-bound on 2
    cores, and two processes of torch threads spin against each other)."""
    from typer.testing import CliRunner

    from inhouse.cli import app as cli

    if os.environ.get("INHOUSE_TEST_DEMO_CACHE"):  # a developer's prebuilt cache (never CI's)
        return Path(os.environ["INHOUSE_TEST_DEMO_CACHE"])
    cache = tmp_path_factory.mktemp("democache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INHOUSE_CACHE", str(cache))
        r = CliRunner().invoke(cli, ["demo", "build"])
    assert r.exit_code == 0, r.output
    return cache


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Marks a test whose body failed (`item.failed`), for fixtures that keep evidence of it
    (the web UI's screenshots)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed = True
