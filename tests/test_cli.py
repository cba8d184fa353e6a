import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from inhouse.cli import app
from inhouse.model.summary import parameter_counts

runner = CliRunner()


@pytest.mark.parametrize("layout", ["hf", "hf-sharded", "hf-bf16", "original"])
def test_inspect_reports_layout_and_sizes(checkpoints, tiny_config, layout):
    result = runner.invoke(app, ["inspect", str(checkpoints[layout]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    want_layout = {"hf-bf16": "hf"}.get(layout, layout)
    assert report["layout"] == want_layout
    assert report["experts"] == ("dense" if layout == "hf-bf16" else "mxfp4")
    counts = parameter_counts(tiny_config)
    assert (report["params_total"], report["params_active"]) == (counts.total, counts.active)
    on_disk = sum(f.stat().st_size for f in checkpoints[layout].glob("*.safetensors"))
    assert report["bytes_on_disk"] == on_disk
    # 2 full-attention layers x (k + v) x 2 kv heads x 16 dims x 2 bytes (bf16)
    assert report["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    context = tiny_config.max_position_embeddings  # a tiny model: thousands of users on a GPU
    users = report["gpu_80gb_users"]
    assert list(users) == [str(n) for n in sorted({min(32768, context), context})], users
    assert all(n > 1000 for n in users.values())


def test_inspect_table(checkpoints):
    result = runner.invoke(app, ["inspect", str(checkpoints["hf"])])
    assert result.exit_code == 0
    assert "hf (mxfp4 experts)" in result.stdout and "active per token" in result.stdout
    assert "one 80 GB GPU" in result.stdout and "users at" in result.stdout


def _assert_one_line_error(result, needle):
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_missing_file_is_one_line(tmp_path):
    _assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "nope")]),
                           "no such file or directory")


def test_truncated_checkpoint_is_one_line(checkpoints, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(checkpoints["hf"], dst)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _assert_one_line_error(runner.invoke(app, ["inspect", str(dst)]), "truncated or corrupt")


def test_other_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    _assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path)]), "model_type 'llama'")


def test_shape_mismatch_is_one_line_through_the_real_console_script(checkpoints, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(checkpoints["hf"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["hidden_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    # `inspect` only reads headers; `demo run` loads the weights, where the shapes are checked
    proc = subprocess.run([sys.executable, "-m", "inhouse.cli", "demo", "run", "--path", str(dst),
                           "--tokens", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "has shape" in err[0] and "config.json implies" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_random_then_run(tmp_path):
    result = runner.invoke(app, ["demo", "random", str(tmp_path / "d"), "--layout", "original"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["demo", "run", "--path", str(tmp_path / "d"), "--tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "greedy decode of 4 tokens" in result.stdout


def test_unknown_layout_is_one_line(tmp_path):
    _assert_one_line_error(runner.invoke(app, ["demo", "random", str(tmp_path), "--layout", "gguf"]),
                           "unknown layout 'gguf'")
