"""PNG metadata: A1111's infotext parses with A1111's own reader, our record is one JSON chunk that round-trips,
no chunk ComfyUI would take for its workflow, and the model hash is A1111's."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.config import SCHEDULER_NAMES
from dreambooth.png_metadata import a1111_parameters, model_name, read_png_record, save_png

# --- A1111's reader, rewritten here from modules/infotext_utils.py (parse_generation_parameters, unquote) -------

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def unquote(text: str) -> str:
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_generation_parameters(text: str) -> dict[str, str]:
    """A1111's reading of a `parameters` chunk: prompt lines, then "Negative prompt:" lines, then the last line of
    "Key: value" pairs (three at least, or it is taken for part of the prompt), "WxH" values split into -1 / -2.
    Only the defaults A1111 adds for missing keys are left out."""
    result: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"], result["Negative prompt"] = prompt, negative
    for key, value in RE_PARAM.findall(last):
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = RE_IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def chunks(path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


# --- the parameters block -----------------------------------------------------------------------------

RECORD = {"prompt": "a photo of miru cat, by the sea: at dusk ☀", "negative_prompt": "blurry, lowres", "seed": 7,
          "steps": 30, "guidance": 6.0, "scheduler": "euler-a", "model": "some-user/miru-model", "height": 32,
          "width": 48}


def test_parameters_parse_with_a1111s_reader_and_the_record_is_one_json_chunk(tmp_path):
    path = tmp_path / "out" / "img.png"
    save_png(Image.new("RGB", (48, 32), "red"), path, RECORD)
    text = chunks(path)
    assert set(text) == {"parameters", "dreambooth"}  # no `prompt` / `workflow` for ComfyUI to choke on
    assert json.loads(text["dreambooth"]) == RECORD == read_png_record(path)
    assert parse_generation_parameters(text["parameters"]) == {
        "Prompt": RECORD["prompt"], "Negative prompt": "blurry, lowres", "Steps": "30", "Sampler": "Euler a",
        "CFG scale": "6.0", "Seed": "7", "Size-1": "48", "Size-2": "32", "Model": "miru-model"}
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]  # no temp file left behind


def test_an_empty_negative_prompt_keeps_its_line_and_quoted_values_read_back(tmp_path):
    run = tmp_path / "cat, v2: best"  # a RUN folder named with the reader's separators
    (run / "pipeline").mkdir(parents=True)
    parameters = a1111_parameters({**RECORD, "negative_prompt": "", "model": str(run / "pipeline")}, (64, 64))
    # ComfyUI's importer makes a workflow only from text with this line.
    assert "\nNegative prompt: \n" in parameters
    parsed = parse_generation_parameters(parameters)
    assert parsed["Negative prompt"] == "" and parsed["Model"] == "cat, v2: best"
    assert str(tmp_path) not in parameters


@pytest.mark.parametrize("scheduler, sampler", [("ddim", "DDIM"), ("ddpm", "DDPM"), ("pndm", "PLMS"),
                                                ("euler", "Euler"), ("euler-a", "Euler a"), ("dpm++", "DPM++ 2M"),
                                                ("unipc", "UniPC")])
def test_every_sampler_is_named_as_a1111_names_it(scheduler, sampler):
    assert scheduler in SCHEDULER_NAMES
    parsed = parse_generation_parameters(a1111_parameters({**RECORD, "scheduler": scheduler}, (8, 8)))
    assert parsed["Sampler"] == sampler


def test_models_are_named_short_never_by_a_path(tmp_path, monkeypatch):
    (tmp_path / "runs" / "miru" / "pipeline").mkdir(parents=True)
    single = tmp_path / "miru-v1.safetensors"
    single.write_bytes(b"weights")
    assert model_name("runwayml/stable-diffusion-v1-5") == "stable-diffusion-v1-5"
    assert model_name(str(tmp_path / "runs" / "miru")) == "miru"
    assert model_name(str(tmp_path / "runs" / "miru" / "pipeline")) == "miru"
    assert model_name(str(tmp_path / "runs" / "miru") + "/") == "miru"
    assert model_name(str(single)) == "miru-v1"
    assert model_name("miniworld") == "miniworld"
    monkeypatch.chdir(tmp_path / "runs" / "miru")
    assert model_name(".") == "miru"


def test_model_hash_is_a1111s_short_sha256_of_the_whole_file_hashed_once(tmp_path):
    single = tmp_path / "miru-v1.safetensors"
    content = os.urandom(3 * 2**20 + 5)  # over several read blocks
    single.write_bytes(content)
    parsed = parse_generation_parameters(a1111_parameters({**RECORD, "model": str(single)}, (8, 8)))
    assert parsed["Model hash"] == hashlib.sha256(content).hexdigest()[:10] and parsed["Model"] == "miru-v1"

    # Other bytes under the same size and time are not read again (a generation hashes its model once) ...
    stat = single.stat()
    single.write_bytes(bytes(len(content)))
    os.utime(single, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = parse_generation_parameters(a1111_parameters({**RECORD, "model": str(single)}, (8, 8)))
    assert again["Model hash"] == parsed["Model hash"]
    # ... but a changed file is.
    os.utime(single, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = parse_generation_parameters(a1111_parameters({**RECORD, "model": str(single)}, (8, 8)))
    assert changed["Model hash"] == hashlib.sha256(bytes(len(content))).hexdigest()[:10]

    folder = parse_generation_parameters(a1111_parameters({**RECORD, "model": str(tmp_path)}, (8, 8)))
    assert "Model hash" not in folder  # a folder or hub id has no single file to hash


# --- the file -----------------------------------------------------------------------------------------


def test_a_record_without_a_prompt_has_no_parameters_and_a_foreign_png_has_no_record(tmp_path):
    path = tmp_path / "grid.png"
    save_png(Image.new("RGB", (8, 8), "blue"), path, {"cells": [[0, 0, 8, 8]], "rows": ["ddim, 1 steps"]})
    assert chunks(path) == {"dreambooth": '{"cells": [[0, 0, 8, 8]], "rows": ["ddim, 1 steps"]}'}

    comfy = PngInfo()
    comfy.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    Image.new("RGB", (8, 8)).save(tmp_path / "comfy.png", pnginfo=comfy)
    assert read_png_record(tmp_path / "comfy.png") == {}


def test_save_png_that_fails_leaves_the_old_image_and_no_temp_file(tmp_path):
    path = tmp_path / "img.png"
    save_png(Image.new("RGB", (8, 8), "blue"), path, {"seed": 1})
    with pytest.raises(OSError, match="CMYK"):
        save_png(Image.new("CMYK", (4, 4)), path, {"seed": 2})  # PNG has no CMYK: the encoder fails mid-write
    with Image.open(path) as image:
        assert image.size == (8, 8) and read_png_record(path) == {"seed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]
