"""Sampling: every sampler renders, seeds fully decide images, PNG metadata, manifest, grid, output-folder rules."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.config import SCHEDULER_NAMES, GenerateConfig
from dreambooth.errors import UserError
from dreambooth.files import folder_lock
from dreambooth.interrupts import Stopped
from dreambooth.models import load_pipeline
from dreambooth.png_metadata import read_png_record
from dreambooth.sampling import SamplingSetting, generate, generation_record, make_grid, make_scheduler, render

STEPS = 2  # enough to exercise multistep samplers, cheap on the tiny model

# Written out independently of sampling.py so a wrong mapping there fails here.
EXPECTED_CLASS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return load_pipeline(str(tiny_model))


@pytest.fixture(scope="module")
def vpred_pipeline(tiny_vpred_model):
    return load_pipeline(str(tiny_vpred_model))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def cells_of(grid: Image.Image) -> list[list[int]]:
    return json.loads(grid.info["cells"])


def assert_lattice(cells: list[list[int]], n_rows: int, n_cols: int) -> None:
    """Cells are equal boxes, row by row, left to right and top to bottom, not overlapping."""
    assert len(cells) == n_rows * n_cols
    sizes = {(right - left, bottom - top) for left, top, right, bottom in cells}
    assert len(sizes) == 1
    for r in range(n_rows):
        row = cells[r * n_cols : (r + 1) * n_cols]
        assert len({top for _, top, _, _ in row}) == 1
        assert all(a[2] <= b[0] for a, b in zip(row, row[1:]))
        if r:
            assert cells[(r - 1) * n_cols][3] <= row[0][1]


# --- schedulers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_builds_and_renders(pipeline, name):
    (image,) = render(pipeline, ["a photo of a cat"], [0], SamplingSetting(STEPS, 7.5, name))
    assert type(pipeline.scheduler).__name__ == EXPECTED_CLASS[name]
    # The model's noise schedule carries over, not the sampler's defaults (beta_end 0.02, linear).
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.scheduler.config.beta_end == pytest.approx(0.012)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert pixels(image).std() > 0


def test_v_prediction_carries_through_every_scheduler(vpred_pipeline):
    base = vpred_pipeline.scheduler.config
    for name in SCHEDULER_NAMES:
        assert make_scheduler(name, base).config.prediction_type == "v_prediction", name
    render(vpred_pipeline, ["a cat"], [0], SamplingSetting(1, 5.0, "euler-a"))
    assert vpred_pipeline.scheduler.config.prediction_type == "v_prediction"


def test_switching_schedulers_does_not_drift(pipeline):
    setting = SamplingSetting(STEPS, 7.5, "ddim")
    (first,) = render(pipeline, ["a photo of a cat"], [3], setting)
    first_config = dict(pipeline.scheduler.config)
    for name in SCHEDULER_NAMES:
        render(pipeline, ["a cat"], [0], SamplingSetting(1, 1.0, name))
    (again,) = render(pipeline, ["a photo of a cat"], [3], setting)
    assert dict(pipeline.scheduler.config) == first_config
    assert np.array_equal(pixels(first), pixels(again))


def test_unknown_scheduler_is_a_user_error(pipeline):
    with pytest.raises(UserError, match="--scheduler euler_a"):
        make_scheduler("euler_a", pipeline.scheduler.config)
    with pytest.raises(UserError, match="--scheduler"):
        render(pipeline, ["a cat"], [0], SamplingSetting(STEPS, 7.5, "heun"))


# --- render -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])  # euler-a also draws noise at every step
def test_render_is_deterministic_per_seed_and_independent_of_batching(pipeline, scheduler):
    setting = SamplingSetting(STEPS, 7.5, scheduler)
    prompts = ["a photo of a cat", "a photo of a cat", "a photo of miru cat"]
    seeds = [0, 1, 2]
    one_by_one = render(pipeline, prompts, seeds, setting, batch_size=1)
    batched = render(pipeline, prompts, seeds, setting, batch_size=3)
    batched_again = render(pipeline, prompts, seeds, setting, batch_size=3)
    for a, b, c in zip(one_by_one, batched, batched_again):
        assert np.array_equal(pixels(b), pixels(c))
        assert np.abs(pixels(a) - pixels(b)).max() <= 2  # float rounding of batched matmuls only
    # The seed, not the batch, decides the noise: same prompt, other seed, another image.
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).max() > 10


def test_render_options(pipeline):
    (image,) = render(pipeline, ["a cat"], [0], SamplingSetting(STEPS, 1.0, "ddim"), height=24, width=40)
    assert image.size == (40, 24)
    setting = SamplingSetting(1, 7.5, "ddim")
    plain = render(pipeline, ["a cat", "a cat"], [0, 1], setting, batch_size=2)
    negative = render(pipeline, ["a cat", "a cat"], [0, 1], setting, negative_prompt="a photo of a cat", batch_size=2)
    for a, b in zip(plain, negative):  # the tiny model barely listens to text, but the same batch is bit-exact
        assert not np.array_equal(pixels(a), pixels(b))
    with pytest.raises(ValueError, match="one seed per image"):
        render(pipeline, ["a cat", "a dog"], [0], SamplingSetting(STEPS, 1.0, "ddim"))


# --- grid ---------------------------------------------------------------------------------------------


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    """Saturated colours that label text (black and greys on white) never produces."""
    return [(255 - 3 * i, 60 + 2 * i, 10 + i) for i in range(n)]


@pytest.mark.parametrize("size, n_rows, n_cols", [(32, 2, 3), (64, 4, 16), (512, 1, 1)])
def test_make_grid_puts_each_image_in_its_cell(size, n_rows, n_cols):
    colors = distinct_colors(n_rows * n_cols)
    rows = [[Image.new("RGB", (size, size), colors[r * n_cols + c]) for c in range(n_cols)] for r in range(n_rows)]
    row_labels = [f"ddim, {10 * (r + 1)} steps, guidance 7.5" for r in range(n_rows)]
    column_labels = [f"a photo of miru cat by the sea\nseed {c}" for c in range(n_cols)]
    grid = make_grid(rows, row_labels, column_labels)
    data = np.asarray(grid)

    cells = cells_of(grid)
    assert_lattice(cells, n_rows, n_cols)
    for index, (left, top, right, bottom) in enumerate(cells):
        ys, xs = np.nonzero(np.all(data == colors[index], axis=-1))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (left, top, right, bottom)
        assert len(xs) == (right - left) * (bottom - top)  # the whole cell, and nowhere else
        assert (right - left) % size == 0
    left, top = cells[0][:2]
    assert left > 0 and top > 0
    assert (data[:top] < 128).any(), "no column labels drawn"
    assert (data[:, :left] < 128).any(), "no row labels drawn"
    assert grid.width >= cells[-1][2] and grid.height >= cells[-1][3]


def test_make_grid_rejects_ragged_rows():
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError):
        make_grid([[image, image], [image]], ["a", "b"], ["x", "y"])


# --- generate -----------------------------------------------------------------------------------------


def generate_config(model: Path, output: Path, **overrides) -> GenerateConfig:
    values = dict(model=str(model), prompt=["a photo of a cat"], output=str(output), steps=[1], seeds=[0])
    values.update(overrides)
    return GenerateConfig(**values)


def test_generate_writes_images_metadata_manifest_and_grid(tiny_model, pipeline, tmp_path):
    prompts = ["a photo of a cat", "a photo of miru cat"]
    # 2 settings x 4 columns, in batches of 3 so one batch is short.
    config = generate_config(tiny_model, tmp_path / "gen", prompt=prompts, steps=[1], guidance=[3.0, 5.0],
                             seeds=[0, 1], negative_prompt="blurry", batch_size=3)
    assert generate(config) == tmp_path / "gen"

    expected = [f"s1-g{g}-p{p}-seed{seed}.png" for g in (3, 5) for p in (0, 1) for seed in (0, 1)]
    files = sorted(p.name for p in (tmp_path / "gen" / "images").iterdir())
    assert files == sorted(expected)

    records = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"images/{name}" for name in expected]
    for record in records:
        _, guidance, p, seed = record["file"][len("images/"):-len(".png")].split("-")
        assert (record["guidance"], record["prompt"], record["seed"]) == (
            float(guidance[1:]), prompts[int(p[1:])], int(seed[4:]))
        assert record["steps"] == 1 and record["scheduler"] == "ddim" and record["model"] == str(tiny_model)
        assert record["negative_prompt"] == "blurry" and (record["height"], record["width"]) == (32, 32)
        # The PNG carries the manifest's line (test_png_metadata checks the A1111 block in full).
        assert read_png_record(tmp_path / "gen" / record["file"]) == {k: v for k, v in record.items() if k != "file"}
        with Image.open(tmp_path / "gen" / record["file"]) as image:
            assert set(image.text) == {"parameters", "dreambooth"}
            assert (f"Steps: 1, Sampler: DDIM, CFG scale: {record['guidance']}, Seed: {record['seed']}, Size: 32x32, "
                    f"Model: {tiny_model.parent.name}") in image.text["parameters"]  # X/pipeline is named X

    # The recorded prompt, seed and setting reproduce the image.
    last = records[-1]
    (again,) = render(pipeline, [last["prompt"]], [last["seed"]], SamplingSetting(1, 5.0, "ddim"),
                      negative_prompt="blurry")
    with Image.open(tmp_path / "gen" / last["file"]) as saved:
        assert np.abs(pixels(saved) - pixels(again)).max() <= 2

    # Grid: one row per setting, one column per (prompt, seed), each cell the image it claims to be.
    with Image.open(tmp_path / "gen" / "grid.png") as grid:
        grid.load()
    cells = read_png_record(tmp_path / "gen" / "grid.png")["cells"]
    assert_lattice(cells, 2, 4)
    gap = cells[1][0] - cells[0][2]
    assert grid.size == (cells[-1][2] + gap, cells[-1][3] + gap)
    for (left, top, right, bottom), record in zip(cells, records):
        scale = (right - left) // 32
        cell = pixels(grid.crop((left, top, right, bottom)))[::scale, ::scale]
        with Image.open(tmp_path / "gen" / record["file"]) as image:
            assert np.array_equal(cell, pixels(image)), record["file"]


@pytest.mark.parametrize("marker", ["images", "manifest.jsonl", "grid.png"])
def test_generate_refuses_a_folder_holding_a_generation(tiny_model, tmp_path, marker):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).mkdir() if marker == "images" else (tmp_path / "out" / marker).write_text("x")
    with pytest.raises(UserError, match=r"--output .* already holds a generation.*--overwrite"):
        generate(generate_config(tiny_model, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [marker]


def test_overwrite_moves_the_old_generation_aside(tiny_model, tmp_path):
    out = tmp_path / "out"
    generate(generate_config(tiny_model, out, prompt=["a photo of a cat"]))
    (out / "notes.txt").write_text("mine")
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"}

    with pytest.raises(UserError, match="--overwrite"):
        generate(generate_config(tiny_model, out, prompt=["a dog"]))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"} == old

    generate(generate_config(tiny_model, out, prompt=["a dog"], overwrite=True))
    (replaced,) = out.glob("replaced-*")
    assert {p.relative_to(replaced): p.read_bytes() for p in replaced.rglob("*") if p.is_file()} == old
    assert (out / "notes.txt").read_text() == "mine"
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["prompt"] == "a dog" and (out / record["file"]).is_file() and (out / "grid.png").is_file()


def test_several_schedulers_make_more_rows_and_name_their_files(tiny_model, tmp_path):
    config = generate_config(tiny_model, tmp_path / "gen", scheduler=["ddim", "euler"], guidance=[3.0])
    generate(config)
    records = [json.loads(line) for line in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["images/ddim-s1-g3-p0-seed0.png", "images/euler-s1-g3-p0-seed0.png"]
    assert [r["scheduler"] for r in records] == ["ddim", "euler"]


# --- continuing, stopping, the folder lock ------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_stopped_generate_continues_to_the_folder_an_uninterrupted_run_makes(tiny_model, tmp_path, monkeypatch):
    # euler-a at 2 steps, batches of 3: here seed 2 comes out a bit different rendered alone than in its batch.
    settings = dict(seeds=list(range(6)), steps=[2], scheduler=["euler-a"], batch_size=3)
    generate(generate_config(tiny_model, tmp_path / "whole", **settings))
    whole = folder_bytes(tmp_path / "whole")

    # SIGTERM while the first batch is saved: the batch is finished, then generate stops and lets the folder go.
    import dreambooth.sampling as sampling

    real_save = sampling.save_listed_image

    def save_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only asks to stop
        return real_save(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(sampling, "save_listed_image", save_then_signal)
    with pytest.raises(Stopped, match=r"^stopped after 3 of 6 images \(SIGTERM\); run the same command again") as stop:
        generate(generate_config(tiny_model, out, **settings))
    assert stop.value.exit_status == 128 + signal.SIGTERM
    monkeypatch.setattr(sampling, "save_listed_image", real_save)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"s2-g7.5-p0-seed{s}.png" for s in range(3)]
    assert not (out / ".dreambooth.lock").exists() and not (out / "grid.png").exists()

    # A listed image gone (its batch is rendered whole again), partial temp files as a kill -9 leaves them.
    (out / "images" / "s2-g7.5-p0-seed2.png").unlink()
    (out / "images" / ".s2-g7.5-p0-seed3.0123abcd.tmp.png").write_bytes(b"half a png")
    (out / ".grid.89abcdef.tmp.png").write_bytes(b"half a grid")
    mine = {"notes.txt": b"mine", ".draft.tmp": b"mine too", "images/.x.tmp.png": b"and mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)

    # The same command again (the model spelled another way, other batches asked for) completes the folder.
    monkeypatch.chdir(tiny_model.parent)
    generate(generate_config(tiny_model.name, out, **{**settings, "batch_size": 1}))
    monkeypatch.chdir(tmp_path)
    # Every image, the manifest (no line twice), the grid and generate.json are byte for byte an uninterrupted run's.
    assert folder_bytes(out) == whole | mine

    # An image written whose manifest line was not (killed between the two): listed once, the image unchanged.
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:-1]))
    generate(generate_config(tiny_model, out, **settings))
    assert folder_bytes(out) == whole | mine

    # A finished generation run again renders nothing.
    monkeypatch.setattr(sampling, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    generate(generate_config(tiny_model, out, **settings))
    assert folder_bytes(out) == whole | mine


@pytest.mark.parametrize("key, value", [("prompt", ["a dog"]), ("seeds", [1]), ("steps", [2]), ("guidance", [3.0]),
                                        ("scheduler", ["euler"]), ("negative_prompt", "blurry"), ("height", 24),
                                        ("lora_scale", 0.5), ("model", "other/model")])
def test_generate_refuses_a_folder_made_with_other_settings(tiny_model, tmp_path, key, value):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "generate.json").write_text(json.dumps(generation_record(generate_config(tiny_model, out))))
    changed = dataclasses.replace(generate_config(tiny_model, out), **{key: value})
    with pytest.raises(UserError, match=rf"^--output {out} already holds a generation made with other settings "
                                        rf"\(--{key.replace('_', '-')} was .*--overwrite to move it aside$"):
        generate(changed)
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "images"]


def test_generate_refuses_a_folder_another_process_writes(tiny_model, tmp_path):
    out = tmp_path / "out"
    with folder_lock(out):  # as another generate holding it would
        with pytest.raises(UserError, match=rf"^--output {out}: process {os.getpid()} on .* is writing it"):
            generate(generate_config(tiny_model, out))
        assert [p.name for p in out.iterdir()] == [".dreambooth.lock"]
    assert not out.exists()


def test_generate_and_class_images_load_the_variant_asked_for(tiny_model, tmp_path, capsys):
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth.cli import main

    folder = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(tiny_model).to(torch.float16).save_pretrained(folder, variant="fp16")
    common = ["--model", str(folder), "--steps", "1", "--height", "32", "--width", "32"]
    assert main(["generate", *common, "--prompt", "a cat", "--output", str(tmp_path / "plain")]) == 2
    assert "--variant fp16" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["generate", *common, "--prompt", "a cat", "--variant", "fp16", "--output", str(tmp_path / "gen")]) == 0
    assert generation_record(GenerateConfig(model=str(folder), prompt=["a cat"], output="x", variant="fp16"))[
        "variant"] == "fp16"  # another variant is another generation
    assert main(["class-images", "--model", str(folder), "--steps", "1", "--prompt", "a cat", "--num-images", "1",
                 "--variant", "fp16", "--output", str(tmp_path / "cats")]) == 0
