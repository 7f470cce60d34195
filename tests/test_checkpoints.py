"""Run folder rules and crash-safe writes."""

import json

import pytest

from dreambooth.checkpoints import RunPaths, claim_run_folder, list_checkpoints, truncate_metrics
from dreambooth.errors import UserError
from dreambooth.files import atomic_dir, read_jsonl


def test_half_written_checkpoints_are_invisible(tmp_path):
    paths = RunPaths(tmp_path)
    (paths.checkpoints / ".step-000004.abcd.tmp").mkdir(parents=True)  # killed while writing
    (paths.checkpoints / "step-000003").mkdir()  # renamed without state.json: not ours, not complete
    complete = paths.checkpoint(2)
    complete.mkdir()
    (complete / "state.json").write_text(json.dumps({"step": 2}))
    assert list_checkpoints(paths) == [(2, complete)]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "pipeline"
    with atomic_dir(final) as folder:
        (folder / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as folder:
            (folder / "a.txt").write_text("second")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no temp folder left behind
    with atomic_dir(final) as folder:
        (folder / "b.txt").write_text("third")
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def test_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a dreambooth run"):
        claim_run_folder(RunPaths(tmp_path), {}, resume=False, overwrite=False)
    assert (tmp_path / "holiday.jpg").exists()


def test_truncate_metrics_drops_steps_to_be_redone_and_a_torn_line(tmp_path):
    paths = RunPaths(tmp_path)
    lines = [json.dumps({"step": s, "loss": 1.0, "seconds": float(s), **({"skipped_steps": s - 1} if s > 1 else {})})
             for s in (1, 2, 3)]
    paths.metrics.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    assert truncate_metrics(paths, 3) == (3.0, 2)  # the seconds and skips of the last line kept
    assert truncate_metrics(paths, 2) == (2.0, 1)
    assert [r["step"] for r in read_jsonl(paths.metrics)] == [1, 2]
    assert truncate_metrics(paths, 0) == (0.0, 0) and read_jsonl(paths.metrics) == []
