"""Every example script runs end to end (tiny settings), as a user would start it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_example(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # default-suite time (20 min on 2 cores): covered by faster cases
@pytest.mark.timeout(600)
def test_train_reference_lm_smoke(tmp_path):
    out = run_example("examples/reference_lm/train.py", "--steps", "3", "--batch-size", "2", "--seq-len", "64",
                      "--out", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck"), "--eval-max-bytes", "2000")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and 0 < metrics["bits_per_byte"] < 12
    assert "greedy sample" in out and (tmp_path / "model.safetensors").exists()


@pytest.mark.slow  # 30+ s on 2 cores: keeps the default suite under 20 minutes
@pytest.mark.timeout(600)
def test_convert_ladder_smoke(tmp_path):
    out = run_example("examples/convert_ladder.py", "--steps", "2", "--batch-size", "2", "--max-bytes", "2048",
                      "--threads", "1", "--out", str(tmp_path))
    metrics = json.loads((tmp_path / "ladder_metrics.json").read_text())["bits_per_byte"]
    assert abs(metrics["healed"] - metrics["healed_tp=2"]) <= 1e-4
    assert "rewired sub-layers [9, 10, 11, 12, 13, 14, 15, 16]" in out


@pytest.mark.timeout(600)
def test_train_medusa_smoke(tmp_path):
    """3 training steps of the Medusa heads; the file holds 4 heads the pass can load, with accuracies."""
    from safetensors import safe_open

    out = run_example("examples/train_medusa.py", "--smoke", "--threads", "1", "--out", str(tmp_path / "h.safetensors"))
    assert "Medusa-1 Vicuna-7B" in out and "default tree" in out
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        assert sorted(f.keys())[:2] == ["0.blocks.0.weight", "0.proj.weight"] and len(f.keys()) == 8
        top1 = json.loads(f.metadata()["top1"])
    assert len(top1) == 4 and all(0 <= a <= 1 for a in top1)
