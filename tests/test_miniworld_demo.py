"""The demo end to end in the miniature world, with fewer steps and images than its defaults.

What it measures is checked against thresholds once the shipped miniature model is trained well enough
to meet the issue's accuracy targets (see src/dreambooth/miniworld/weights/MEASUREMENTS.md).
"""

from __future__ import annotations

import json

import pytest

from dreambooth.config import DemoConfig
from dreambooth.errors import UserError
from dreambooth.miniworld import weights_available

pytestmark = pytest.mark.skipif(not weights_available(), reason="pretrained miniworld weights not shipped yet")


def test_demo_runs_the_whole_story_and_reports_it(tmp_path):
    from dreambooth.miniworld.demo import SCENES, run_demo

    config = DemoConfig(output=str(tmp_path), max_train_steps=4, num_class_images=4, num_seeds=2, sampling_steps=[5, 10])
    report = run_demo(config).read_text()
    for link in ("samples/grid.png", "baseline/grid.png", "run/loss.png"):
        assert link in report and (tmp_path / link).is_file()
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    settings = {"steps 5, guidance 5", "steps 10, guidance 5", "all settings"}
    assert set(numbers["tuned"]) == set(numbers["no_prior"]) == set(numbers["base"]) == settings
    for values in numbers["tuned"].values():
        assert 0 <= values["marking_rate"] <= 1 and values["pres"] is not None
    assert numbers["tuned"]["all settings"]["n"] == len(SCENES) * 2 * 2
    assert [c["claim"].split()[0] for c in numbers["checks"]] == ["subject", "miru's", "scene", "PRES"]
    assert "samples-no-prior/grid.png" in report and not (tmp_path / "run-no-prior" / "class-images").exists()
    assert len(list((tmp_path / "class-images").glob("*.png"))) == 4
    with pytest.raises(UserError, match="holds an earlier demo"):
        run_demo(config)
