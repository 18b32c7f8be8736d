"""The benchmark script runs end to end on the smoke profile and writes every figure it prints."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmarks.py"


@pytest.mark.slow
def test_benchmark_script_writes_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "smoke", "--steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for phase in ("pretext", "finetune_full", "finetune_head"):
        assert figures[f"{phase}_drnb_images_per_second"] > 0
        assert figures[f"{phase}_bare_images_per_second"] > 0
        # Alternating rounds, each a pipeline block beside a constant-batch block: the ratio
        # is the median of the rounds' ratios.
        rounds = figures[f"{phase}_ratio_rounds"]
        assert len(rounds) == 5
        assert figures[f"{phase}_ratio"] == pytest.approx(np.median(rounds), abs=1e-3)
    # The input pipelines alone are measured under their own names, not overwritten by training rates.
    assert figures["pretext_input_images_per_second"] != figures["pretext_drnb_images_per_second"]
    assert figures["finetune_input_images_per_second"] > 0 and figures["numpy_matmul_gflops"] > 0
    assert "finetune_flops_to_matmul_peak" in result.stdout
    assert 0 < figures["preprocess_aptos_sized_photograph_seconds"] < 60
