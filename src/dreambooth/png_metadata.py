"""What a PNG we write says about itself, in two text chunks.

`parameters`: AUTOMATIC1111's infotext (prompt, negative prompt, then "Steps: N, Sampler: X, ..."), which A1111's
PNG Info tab reads and ComfyUI turns into a workflow. `dreambooth`: our own record, one JSON object, under a name
no other tool reads. Nothing else: ComfyUI reads a chunk named `prompt` (or `workflow`) as its own workflow JSON
and fails on anything else there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.files import atomic_file

PARAMETERS = "parameters"
RECORD = "dreambooth"

# Our --scheduler names as A1111 names its samplers (its "PLMS" is PNDM without the Runge-Kutta warm-up, which is
# how make_scheduler builds pndm; A1111 has no DDPM sampler, so that keeps the diffusers name).
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "euler": "Euler",
    "euler-a": "Euler a", "dpm++": "DPM++ 2M", "unipc": "UniPC",
}

_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}  # a single-file model, here or not (any longer)
# Folders inside a run that a model may be named by; the run's own name says more.
_RUN_PARTS = {"pipeline", "lora"}

# (resolved path, size, mtime in ns) -> the file's sha256: a generation of many images hashes its model once.
_HASHES: dict[tuple[str, int, int], str] = {}


def model_name(model: str) -> str:
    """A model as A1111's `Model:` names one: a file by its stem, a folder (a RUN) or hub id by its last part;
    never a local path, which would leak the user's folders into every shared image."""
    path = Path(model).expanduser()
    if path.is_file() or path.suffix.lower() in _FILE_SUFFIXES:
        return path.stem
    # A folder by its full path, so "." or "run/.." name the folder they mean.
    named = path.resolve() if path.is_dir() else Path(model)
    parts = [part for part in named.parts if part != named.anchor]
    while len(parts) > 1 and parts[-1] in _RUN_PARTS:
        parts.pop()
    return parts[-1] if parts else model


def model_hash(model: str) -> str | None:
    """A1111's short hash of a single-file model (the first 10 hex digits of the whole file's sha256, as its
    sd_models.py shows next to a checkpoint's name); None for a folder or hub id, which A1111 cannot load."""
    path = Path(model).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key][:10]


def _quote(value: Any) -> str:
    text = str(value)
    # A1111's reader splits the last line on ", " and ": "; like A1111 (infotext_utils.quote) we JSON-quote values
    # holding either, or a line break.
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(record: dict[str, Any], size: tuple[int, int]) -> str:
    """The `parameters` text A1111 writes for an image of `size` (width, height) made as `record` says."""
    model = record.get("model")
    fields = {
        "Steps": record.get("steps"),
        "Sampler": A1111_SAMPLER_NAMES.get(str(record.get("scheduler")), record.get("scheduler")),
        "CFG scale": record.get("guidance"),
        "Seed": record.get("seed"),
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": model_hash(str(model)) if model else None,  # before "Model", in A1111's order
        "Model": model_name(str(model)) if model else None,
    }
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    # The negative-prompt line even when empty: ComfyUI's importer builds a workflow only when it finds one.
    return f"{record.get('prompt', '')}\nNegative prompt: {record.get('negative_prompt') or ''}\n{settings}"


def save_png(image: Image.Image, path: Path, record: dict[str, Any]) -> None:
    """Write a PNG carrying `record` (JSON values) as its `dreambooth` chunk, and, when the record has a prompt,
    A1111's `parameters`; readers never see a half-written file."""
    info = PngInfo()
    info.add_text(RECORD, json.dumps(record, ensure_ascii=False))  # an iTXt chunk when it is not Latin-1
    if "prompt" in record:
        info.add_text(PARAMETERS, a1111_parameters(record, image.size))
    with atomic_file(Path(path)) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_record(path: Path) -> dict[str, Any]:
    """The record save_png wrote into the PNG at `path`; {} for a PNG without one (from another tool, or from a
    version before the `dreambooth` chunk, whose per-field chunks are not read: the folder's manifest.jsonl
    holds the same record and is what every command reads)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(RECORD)
    return json.loads(text) if text else {}
