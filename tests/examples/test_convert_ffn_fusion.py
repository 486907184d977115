"""examples/convert_ffn_fusion.py end to end in --smoke mode: every step's bits per byte, the FFN
count, the runs it chose from the measured attention importance, the reload through the same
passes on tp=2, and that a rerun resumes (skips what is done)."""

import json

import pytest

from tests.examples.test_examples import run_example


@pytest.mark.slow  # ~1 min alone on 2 cores (two-rank tp=2 run included), 2+ min when the machine is shared
@pytest.mark.timeout(900)
def test_convert_ffn_fusion_smoke(tmp_path):
    out = run_example("examples/convert_ffn_fusion.py", "--smoke", "--threads", "1", "--out", str(tmp_path))
    m = json.loads((tmp_path / "ffn_fusion_metrics.json").read_text())
    b = m["bits_per_byte"]
    for key in ("original", "attention_removed", "attention_removed_healed", "fused", "fused_healed",
                "parallel_blocks", "parallel_blocks_healed"):
        assert 0 < b[key] < 12, key
    assert abs(b["fused_healed"] - b["fused_healed_tp=2"]) <= 1e-4  # reloaded by name through the same passes
    imp = m["attention_importance"]
    removed = sorted(sorted(range(8), key=lambda k: imp[str(k)])[:4])
    assert m["removed_attention"] == removed and b["attention_removed"] > b["original"]
    assert m["ffn_count"]["original"] == 8 and m["ffn_count"]["fused"] == 8 - sum(len(r) - 1 for r in m["runs"])
    assert "FFNs 8 -> " in out and (tmp_path / "fused" / "model.safetensors").exists()
    again = run_example("examples/convert_ffn_fusion.py", "--smoke", "--threads", "1", "--out", str(tmp_path))
    assert "step 2/2" not in again  # every heal was done: loaded, not repeated
    assert json.loads((tmp_path / "ffn_fusion_metrics.json").read_text())["bits_per_byte"] == b
