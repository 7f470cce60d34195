"""The filesystem rules: atomic files and folders, JSON lines that survive a crash, locks, moving aside."""

from __future__ import annotations

import json
import threading
import time

import pytest
from PIL import Image

from dreambooth.files import (append_jsonl, atomic_dir, atomic_file, atomic_write_text, locked, move_aside,
                              read_jsonl, replace_dir, write_jsonl)


def leftovers(folder) -> list[str]:
    """Hidden temporary names a writer could leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_the_old_file_on_success(tmp_path):
    path = tmp_path / "new" / "notes.txt"  # the folder is created too
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("first")
    with atomic_file(path) as tmp:
        tmp.write_text("second")
        assert path.read_text() == "first"  # readers see the old file until the writer is done
    assert path.read_text() == "second"
    assert leftovers(path.parent) == []


def test_atomic_file_keeps_the_old_file_and_no_temp_file_on_failure(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_atomic_file_keeps_the_suffix_so_writers_pick_the_format(tmp_path):
    for name in ("plot.png", "page.html", "archive.tar.gz"):
        with atomic_file(tmp_path / name) as tmp:
            assert tmp.suffix == (tmp_path / name).suffix
            if name.endswith(".png"):
                Image.new("RGB", (4, 4), "red").save(tmp)  # PIL picks PNG from the suffix
            else:
                tmp.write_text(name)
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG"


def test_atomic_write_text_writes_utf8(tmp_path):
    atomic_write_text(tmp_path / "a.md", "miru – 白い猫\n")
    assert (tmp_path / "a.md").read_bytes() == "miru – 白い猫\n".encode()
    atomic_write_text(tmp_path / "a.md", "shorter")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "shorter"
    assert leftovers(tmp_path) == []


def test_write_read_and_append_json_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert read_jsonl(path) == []  # a missing file reads as no records
    write_jsonl(path, [{"step": 1}, {"step": 2}])
    append_jsonl(path, {"step": 3, "note": "appended"})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3, "note": "appended"}]
    write_jsonl(path, ({"step": s} for s in (7,)))  # rewrites the whole file; any iterable
    assert path.read_text() == '{"step": 7}\n'


def test_read_jsonl_skips_a_torn_last_line_and_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    append_jsonl(path, {"step": 4})  # the run resumes: its next record starts a line of its own
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 4}]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    final = tmp_path / "step-000010"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_text("v1")
        assert not final.exists()
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise KeyboardInterrupt
    assert (final / "weights.bin").read_text() == "v1"
    with atomic_dir(final) as tmp:
        (tmp / "other.bin").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["other.bin"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]


def test_replace_dir_onto_a_missing_and_a_full_folder(tmp_path):
    for version in ("v1", "v2"):
        complete = tmp_path / f"built-{version}"
        complete.mkdir()
        (complete / "file").write_text(version)
        replace_dir(complete, tmp_path / "final")
        assert not complete.exists()
    assert (tmp_path / "final" / "file").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_locked_lets_one_holder_in_at_a_time(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    order: list[str] = []

    def second_holder() -> None:
        with locked(lock):
            order.append("second")

    with locked(lock):
        thread = threading.Thread(target=second_holder)
        thread.start()
        time.sleep(0.3)  # without the lock the thread would have appended by now
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]


def test_move_aside_moves_only_what_exists_and_never_reuses_a_folder(tmp_path):
    assert move_aside(tmp_path, ["images", "grid.png"]) is None
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_text("a")
    (tmp_path / "grid.png").write_text("grid")
    (tmp_path / "keep.txt").write_text("not named")
    first = move_aside(tmp_path, ["images", "grid.png", "manifest.jsonl"])
    assert first.parent == tmp_path and first.name.startswith("replaced-")
    assert sorted(p.name for p in first.iterdir()) == ["grid.png", "images"]
    assert (first / "images" / "a.png").read_text() == "a"
    (tmp_path / "grid.png").write_text("grid 2")
    second = move_aside(tmp_path, ["grid.png"])  # same second: a new folder, the first one untouched
    assert second != first and (second / "grid.png").read_text() == "grid 2"
    assert (first / "grid.png").read_text() == "grid"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("replaced-")) == ["keep.txt"]
