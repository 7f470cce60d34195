"""The DreamBooth paper's metrics (arXiv 2208.12242) for a `generate` output and a folder of real photos.

DINO and CLIP-I: mean cosine between a generated image's embedding and every reference photo's.
CLIP-T: cosine between an image and its prompt. PRES: DINO similarity of plain class-prompt images to
the subject (lower is better). DIV: mean pairwise distance between images of one prompt (higher is better).
The embedding models are loaded here and nowhere else; every distinct image file is embedded once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from dreambooth.aliases import embedding_alias_folder
from dreambooth.config import EvaluateConfig
from dreambooth.data import list_images, load_image
from dreambooth.errors import UserError
from dreambooth.files import MANIFEST, read_jsonl, write_jsonl

DINO_TYPES = ("vit", "dinov2")  # backbones whose CLS token is the image embedding


@dataclass
class EmbeddingModels:
    """CLIP (both towers) and the DINO model, their preprocessing, and the embeddings computed so far."""

    clip: Any  # transformers CLIPModel
    tokenizer: Any
    clip_processor: Any  # a transformers image processor
    dino: Any  # a ViT (DINO) or a CLIPModel standing in for one
    dino_processor: Any
    dino_is_clip: bool
    device: torch.device
    lpips: Any | None = None  # an lpips.LPIPS network when the package works, else DIV is 1 - DINO cosine
    # (kind, file, mtime, size) -> embedding: a sweep re-measures the same references for every trial.
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)


def _default_device() -> torch.device:
    from dreambooth.models import default_device  # imported late: models pulls in diffusers

    return default_device()


def _load(name: str, flag: str, want: Literal["clip", "dino"]) -> tuple[Any, Any, bool]:
    """(model, image processor, is_clip) for a hub id or folder; a UserError naming `flag` on any failure."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPModel, ViTModel

    source, local = _source(name, flag)
    folder = Path(source)
    if not local and (Path(name).is_absolute() or name.startswith((".", "~"))):
        raise UserError(f"{flag} {name}: folder not found; check the path")
    if local and not (folder / "config.json").is_file():
        raise UserError(f"{flag} {name}: no config.json in this folder; give a transformers model folder or a hub id")
    # Safetensors where the folder has them: loading a pickle runs code from the file.
    safetensors = True if local and any(folder.glob("*.safetensors")) else None
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        if config.model_type == "clip":
            model = CLIPModel.from_pretrained(source, dtype=torch.float32, use_safetensors=safetensors)
        elif want == "dino" and config.model_type in DINO_TYPES:
            extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # DINO has no pooler
            model_class = ViTModel if config.model_type == "vit" else AutoModel
            model = model_class.from_pretrained(source, dtype=torch.float32, use_safetensors=safetensors, **extra)
        else:
            kinds = "a CLIP model" if want == "clip" else "a ViT (DINO) or CLIP model"
            raise UserError(f"{flag} {name}: model_type {config.model_type!r} is not {kinds}")
        if local and not (folder / "preprocessor_config.json").is_file():
            # A folder saved from the model alone (the miniature world's world-CLIP) was trained on pixels
            # squashed to its image size in [-1, 1], the diffusers range: mean = std = 0.5 reproduces that.
            side = _vision_config(config).image_size
            processor = CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
        else:
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        where = "this folder" if local else "this hub id (offline, misspelt or private?)"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag} {name}: cannot load {where}: {reason}") from err
    return model.eval(), processor, config.model_type == "clip"


def _source(name: str, flag: str = "--clip-model") -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder): a registered alias (`dreambooth.aliases`,
    e.g. `miniworld` for the world-CLIP) first, then an existing path, then a hub id."""
    alias_folder = embedding_alias_folder(name, flag)
    if alias_folder is not None:
        return str(alias_folder), True
    folder = Path(name).expanduser()
    return (str(folder), True) if folder.exists() else (name, False)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", config)


def _load_lpips(device: torch.device) -> Any | None:
    """LPIPS (AlexNet) if the package imports and its weights load; None means DIV falls back to 1 - DINO."""
    try:
        import lpips
    except ImportError:  # lpips needs torchvision; without it the fallback is the honest choice
        return None
    try:
        return lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except (OSError, RuntimeError) as err:  # the AlexNet weights come from a download
        print(f"evaluate: lpips is installed but did not load ({err}); DIV uses 1 - DINO cosine")
        return None


def load_embedding_models(clip_model: str, dino_model: str,
                          device: str | torch.device | None = None) -> EmbeddingModels:
    """Load CLIP (image and text towers) and DINO, or a CLIP standing in for DINO, in float32 on `device`."""
    from transformers import CLIPTokenizer

    device = torch.device(device) if device is not None else _default_device()
    clip, clip_processor, _ = _load(clip_model, "--clip-model", "clip")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(_source(clip_model)[0])
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"--clip-model {clip_model}: no CLIP tokenizer (vocab.json + merges.txt) found") from err
    if dino_model == clip_model:  # one model in both roles (the miniature world): load it once
        dino, dino_processor, dino_is_clip = clip, clip_processor, True
    else:
        dino, dino_processor, dino_is_clip = _load(dino_model, "--dino-model", "dino")
    return EmbeddingModels(clip.to(device), tokenizer, clip_processor, dino.to(device), dino_processor,
                           dino_is_clip, device, _load_lpips(device))


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a tensor
    return getattr(output, "pooler_output", output)


@torch.no_grad()
def image_embeddings(models: EmbeddingModels, images: list[Image.Image], kind: Literal["clip", "dino"],
                     batch_size: int = 16) -> torch.Tensor:
    """One L2-normalised embedding per image (rows), on the CPU in float32."""
    if kind not in ("clip", "dino"):
        raise ValueError(f"image_embeddings: kind must be 'clip' or 'dino', not {kind!r}")
    model, processor = (models.clip, models.clip_processor) if kind == "clip" else (models.dino, models.dino_processor)
    is_clip = kind == "clip" or models.dino_is_clip
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [image.convert("RGB") for image in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(models.device, torch.float32)
        if is_clip:
            chunks.append(_features(model.get_image_features(pixel_values=pixels)))
        else:
            chunks.append(model(pixel_values=pixels).last_hidden_state[:, 0])  # the CLS token is DINO's embedding
    if not chunks:
        return torch.zeros(0, 0)
    return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu()


@torch.no_grad()
def text_embeddings(models: EmbeddingModels, prompts: list[str]) -> torch.Tensor:
    """One L2-normalised CLIP text embedding per prompt (rows), on the CPU in float32."""
    if not prompts:
        return torch.zeros(0, models.clip.config.projection_dim)
    # The position table bounds the length even where the tokenizer's model_max_length is unset (huge).
    length = min(models.tokenizer.model_max_length, models.clip.config.text_config.max_position_embeddings)
    tokens = models.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    features = _features(models.clip.get_text_features(input_ids=tokens.input_ids.to(models.device),
                                                       attention_mask=tokens.attention_mask.to(models.device)))
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


def standard_error(values: list[float]) -> float:
    """Standard error of the mean: sample standard deviation (ddof=1) / sqrt(n); 0.0 below two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _read_manifest(samples_dir: Path) -> list[dict[str, Any]]:
    """The manifest's records with `path` added; a UserError naming the folder or the missing file."""
    manifest = samples_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{samples_dir}: no {MANIFEST}; pass a folder written by `dreambooth generate`")
    records = read_jsonl(manifest)
    if not records:
        raise UserError(f"{manifest}: no images listed; run `dreambooth generate` again")
    for record in records:
        missing = [key for key in ("file", "prompt", "steps", "guidance", "scheduler") if key not in record]
        if missing:
            raise UserError(f"{manifest}: a line lacks {', '.join(missing)}; "
                            "it was not written by `dreambooth generate`")
        record["path"] = samples_dir / record["file"]
        if not record["path"].is_file():
            raise UserError(f"{record['path']}: listed in {manifest} but missing; run `dreambooth generate` again")
    return records


def _embed_files(models: EmbeddingModels, paths: list[Path], kind: Literal["clip", "dino"],
                 batch_size: int) -> torch.Tensor:
    """Embeddings of image files, computing only those not yet in models.cache (decoded a batch at a time)."""
    keys = []
    for path in paths:
        stat = path.stat()  # mtime and size: a file rewritten under the same name is embedded again
        keys.append((kind, str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    todo = list(dict.fromkeys(key for key in keys if key not in models.cache))
    for start in range(0, len(todo), batch_size):
        part = todo[start : start + batch_size]
        embedded = image_embeddings(models, [load_image(Path(key[1])) for key in part], kind, batch_size)
        models.cache.update(zip(part, embedded))
    return torch.stack([models.cache[key] for key in keys])


def _lpips_distances(models: EmbeddingModels, paths: list[Path]) -> list[float]:
    """LPIPS between every pair of images; images of one prompt and setting share their size."""
    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.asarray(load_image(p), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for p in paths]).to(models.device)
    with torch.no_grad():
        return [float(models.lpips(pixels[i : i + 1], pixels[j : j + 1]).flatten()[0])
                for i, j in itertools.combinations(range(len(paths)), 2)]


def evaluate_samples(samples_dir: Path, reference_dir: Path, models: EmbeddingModels, class_prompt: str | None = None,
                     batch_size: int = 16) -> list[dict[str, Any]]:
    """One row per (steps, guidance, scheduler) setting x prompt, class-prompt images giving that setting's PRES."""
    samples_dir, reference_dir = Path(samples_dir), Path(reference_dir)
    records = _read_manifest(samples_dir)
    references = list_images(reference_dir, "--reference-dir")
    ref_dino = _embed_files(models, references, "dino", batch_size)
    ref_clip = _embed_files(models, references, "clip", batch_size)
    paths = [record["path"] for record in records]
    dino = _embed_files(models, paths, "dino", batch_size)
    clip = _embed_files(models, paths, "clip", batch_size)
    # Per image: mean cosine to every reference (the embeddings are unit vectors, so a dot product).
    dino_to_refs = (dino.double() @ ref_dino.double().T).mean(dim=1).tolist()
    clip_to_refs = (clip.double() @ ref_clip.double().T).mean(dim=1).tolist()
    prompts = list(dict.fromkeys(record["prompt"] for record in records))
    text = dict(zip(prompts, text_embeddings(models, prompts)))
    clip_t = [float(clip[i].double() @ text[record["prompt"]].double()) for i, record in enumerate(records)]
    div_metric = "lpips" if models.lpips is not None else "1-dino"

    groups: dict[tuple, dict[str, list[int]]] = {}  # setting -> prompt -> image indices, in manifest order
    for i, record in enumerate(records):
        setting = (record["steps"], record["guidance"], record["scheduler"])
        groups.setdefault(setting, {}).setdefault(record["prompt"], []).append(i)

    rows = []
    for (steps, guidance, scheduler), by_prompt in groups.items():
        pres_values = [dino_to_refs[i] for i in by_prompt.get(class_prompt, [])] if class_prompt is not None else []
        for prompt, indices in by_prompt.items():
            if prompt == class_prompt:
                continue
            if div_metric == "lpips":
                distances = _lpips_distances(models, [paths[i] for i in indices])
            else:
                distances = [1.0 - float(dino[i].double() @ dino[j].double())
                             for i, j in itertools.combinations(indices, 2)]
            row: dict[str, Any] = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "prompt": prompt,
                                   "n": len(indices)}
            per_image = {"dino": [dino_to_refs[i] for i in indices], "clip_i": [clip_to_refs[i] for i in indices],
                         "clip_t": [clip_t[i] for i in indices], "pres": pres_values, "div": distances}
            for name, values in per_image.items():
                row[name], row[f"{name}_se"] = _mean(values), standard_error(values)
            row["div_metric"] = div_metric
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], name: str) -> str:
    return "-" if row[name] is None else f"{row[name]:.3f}±{row[f'{name}_se']:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows, one line each (means ± standard errors)."""
    names = ("dino", "clip_i", "clip_t", "pres", "div")
    lines = [f"{'setting':<24} {'prompt':<36} {'n':>3} " + " ".join(f"{n:>13}" for n in names)]
    for row in rows:
        setting = f"{row['scheduler']} {row['steps']} g{row['guidance']:g}"
        prompt = row["prompt"] if len(row["prompt"]) <= 36 else row["prompt"][:33] + "..."
        lines.append(f"{setting:<24} {prompt:<36} {row['n']:>3} " + " ".join(f"{_cell(row, n):>13}" for n in names))
    return "\n".join(lines)


def evaluate(config: EvaluateConfig) -> Path:
    """`dreambooth evaluate`: measure SAMPLES against the reference photos; write metrics.jsonl and print a table."""
    samples = Path(config.samples)
    # Check the folders before the (slow) model loading, so a typo fails in a second.
    _read_manifest(samples)
    list_images(config.reference_dir, "--reference-dir")
    models = load_embedding_models(config.clip_model, config.dino_model)
    rows = evaluate_samples(samples, Path(config.reference_dir), models, config.class_prompt, config.batch_size)
    output = Path(config.output) if config.output else samples / "metrics.jsonl"
    write_jsonl(output, rows)
    print(format_table(rows))
    if rows and all(row["pres"] is None for row in rows):
        print("PRES: none (it needs --class-prompt and images generated with that prompt)")
    print(f"DIV is {'LPIPS' if models.lpips is not None else '1 - DINO cosine'}; wrote {output}")
    return output
