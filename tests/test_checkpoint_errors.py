"""Bad checkpoints: each gives a CheckpointError/ConfigError whose message says what is wrong."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from inhouse.errors import CheckpointError, ConfigError
from inhouse.model import load_model


@pytest.fixture
def hf_copy(checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)


def test_truncated_safetensors(hf_copy):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(hf_copy)


def test_garbage_header(hf_copy):
    (hf_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(hf_copy)


def test_config_of_another_architecture(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        load_model(hf_copy)


def test_invalid_json(hf_copy):
    (hf_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(hf_copy)


def test_shape_mismatch(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_up_proj_bias' has shape \[8, 128\], config.json implies \[8, 192\]"):
        load_model(hf_copy)


def test_missing_tensor(hf_copy):
    f = hf_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.2.self_attn.sinks"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.self_attn.sinks'"):
        load_model(hf_copy)


def test_missing_shard(checkpoints, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(checkpoints["hf-sharded"], dst)
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name} is listed in model.safetensors.index.json but missing"):
        load_model(dst)
