"""bench/gpu_kontext.py: its FLOP model, and a real run of every row in the shrunken CPU mode CI affords."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_kontext import transformer_flops
from kontextd.backends.tiny import FULL

ROOT = Path(__file__).parent.parent


def test_flop_model_matches_the_published_cost_at_1024() -> None:
    # The inference notes: about 74 TFLOP per text-to-image step and 165 per edit step at 1024x1024.
    assert transformer_flops(FULL, 4096, 0) / 1e12 == pytest.approx(74, rel=0.01)
    assert transformer_flops(FULL, 4096, 4096) / 1e12 == pytest.approx(165, rel=0.01)


def test_cpu_mode_runs_every_row() -> None:
    completed = subprocess.run(
        [sys.executable, "bench/gpu_kontext.py", "--device", "cpu", "--batches", "1,2", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [
        line.split() for line in completed.stdout.splitlines() if line.startswith(("text-to-image", "edit"))
    ]
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [
        (task, batch, *method.split())
        for task in ("text-to-image", "edit")
        for batch in ("1", "2")
        for method in ("diffusers eager", "kontextd none", "kontextd regular", "kontextd high")
    ]
    # What each level ran, and what it skipped on a CPU.
    assert "# high: fused QKV, first block cache (compute every 2 steps)" in completed.stdout
    assert "# skipped fp8: fp8 matmuls need a CUDA GPU" in completed.stdout
    for row in rows:
        seconds, per_hour = float(row[4]), float(row[5])
        assert seconds > 0 and per_hour == pytest.approx(3600 / seconds, rel=0.02)  # both printed rounded
        assert row[7] == "n/a"  # no roofline on a CPU
        assert row[8].endswith("x")
