"""The benchmarks run (quick mode): the numbers themselves belong to benchmarks/, never to timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_shipped_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_speed_quick_mode_writes_its_table_and_json(tmp_path):
    require_shipped_weights()
    output = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--quick", "--threads", "1",
                             "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speed-up" in result.stdout
    runs = json.loads(output.read_text())["miniworld"]
    assert set(runs) == {"False", "True"}
    for run in runs.values():
        assert run["median_step_seconds"] > 0 and run["peak_rss_mb"] > 0 and len(run["losses"]) == 4
