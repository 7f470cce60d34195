"""The benchmarks run (quick mode): the numbers themselves belong to benchmarks/, never to timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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


@pytest.mark.slow
def test_class_images_speed_quick_mode_writes_its_table_json_and_grid(tmp_path):
    require_shipped_weights()
    output, grid = tmp_path / "speed.json", tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "class_images_speed.py"), "--quick",
                             "--threads", "1", "--output", str(tmp_path / "images"), "--grid", str(grid),
                             "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vs baseline" in result.stdout
    measured = json.loads(output.read_text())["models"]["miniworld"]
    configs = measured["configs"]
    assert [(configs[name]["scheduler"], configs[name]["steps"]) for name in ("default", "baseline")] == [
        ("dpm++", 25), ("pndm", 50)]
    for config in configs.values():
        assert config["images"] == 4 and config["images_per_second"] > 0 and config["ratio_to_baseline"] > 0
    quality = measured["quality"]
    assert quality["pixel_mad_same_seed"] < quality["pixel_mad_different_seeds"]
    assert measured["grid"] == str(grid)
    with Image.open(grid) as image:
        cells = json.loads(image.text["cells"])
        assert len(cells) == 2 * 4  # rows = the two settings, columns = the four seeds
        # Every 64 px image shown at one whole multiple of its size, with room left for the labels.
        (side, side_too), = {(right - left, bottom - top) for left, top, right, bottom in cells}
        assert side == side_too and side % 64 == 0
        assert image.width > 4 * side and image.height > 2 * side
