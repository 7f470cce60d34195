"""DINO, CLIP-I, CLIP-T, PRES and DIV against direct computations on tiny random CLIP and DINO-shaped ViT folders."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from dreambooth.config import EvaluateConfig
from dreambooth.errors import UserError
from dreambooth.files import write_jsonl
from dreambooth.metrics import (
    evaluate,
    evaluate_samples,
    image_embeddings,
    load_embedding_models,
    mean_pairwise_cosine,
    standard_error,
    text_embeddings,
)

from conftest import TINY_EMBEDDING_SIDE as SIDE  # test images of this size pass resizing unchanged
CLASS_PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def models(clip_folder, dino_folder):
    return load_embedding_models(str(clip_folder), str(dino_folder), device="cpu")


def write_samples(folder: Path, groups: dict[tuple, dict[str, list[Path]]]) -> None:
    """A `generate`-shaped folder: copies of the given PNGs under images/ and one manifest line per image."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for (steps, guidance), by_prompt in groups.items():
        for p, (prompt, sources) in enumerate(by_prompt.items()):
            for seed, source in enumerate(sources):
                name = f"images/s{steps}-g{guidance:g}-p{p}-seed{seed}.png"
                (folder / name).write_bytes(source.read_bytes())
                lines.append({"file": name, "prompt": prompt, "negative_prompt": "", "seed": seed, "steps": steps,
                              "guidance": guidance, "scheduler": "ddim", "model": "tiny",
                              "height": SIDE, "width": SIDE})
    write_jsonl(folder / "manifest.jsonl", lines)


def load(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def test_standard_error_and_mean_pairwise_cosine_match_direct_computation():
    values = [0.2, 0.5, 0.9, 0.4]
    assert standard_error(values) == pytest.approx(statistics.stdev(values) / math.sqrt(4))
    assert standard_error([0.7]) == 0.0 and standard_error([]) == 0.0
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(4, 5) * 7  # unnormalised: the function must normalise
    direct = [float(torch.dot(x, y) / (x.norm() * y.norm())) for x in a for y in b]
    assert mean_pairwise_cosine(a, b) == pytest.approx(sum(direct) / len(direct), abs=1e-6)


def test_dino_embedding_is_the_normalised_cls_token(models, dino_folder, tmp_path):
    from transformers import ViTModel

    images = load(write_images(tmp_path, 3, size=SIDE, seed=3))
    got = image_embeddings(models, images, "dino", batch_size=2)
    # Preprocess by hand (no resize at 32 px): scale to [0, 1], ImageNet mean and std.
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (pixels - imagenet_mean) / imagenet_std
    with torch.no_grad():
        vit = ViTModel.from_pretrained(dino_folder, add_pooling_layer=False)
        cls = vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5, rtol=1e-4)


def test_clip_image_and_text_embeddings_match_direct_model_calls(models, clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    images = load(write_images(tmp_path, 2, size=SIDE, seed=4))
    prompts = ["a photo of miru cat", "a photo of a cat by the sea"]
    clip = CLIPModel.from_pretrained(clip_folder)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    ids = CLIPTokenizer.from_pretrained(clip_folder)(prompts, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want_images = clip.get_image_features(pixel_values=(pixels - mean) / std).pooler_output
        want_text = clip.get_text_features(input_ids=ids).pooler_output
    got_images = image_embeddings(models, images, "clip")
    got_text = text_embeddings(models, prompts)
    torch.testing.assert_close(got_images, torch.nn.functional.normalize(want_images, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_text, torch.nn.functional.normalize(want_text, dim=-1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_text.norm(dim=-1), torch.ones(2))


def test_identical_images_give_dino_one_and_div_zero(models, tmp_path):
    [photo] = write_images(tmp_path / "refs", 1, size=SIDE, seed=5)
    write_samples(tmp_path / "samples", {(30, 6.0): {"a photo of miru cat": [photo, photo, photo]}})
    [row] = evaluate_samples(tmp_path / "samples", tmp_path / "refs", models)
    assert row["n"] == 3 and row["prompt"] == "a photo of miru cat"
    assert row["dino"] == pytest.approx(1.0, abs=1e-5) and row["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert row["div"] == pytest.approx(0.0, abs=1e-5) and row["div_se"] == pytest.approx(0.0, abs=1e-5)
    assert row["div_metric"] == "1-dino"
    assert row["pres"] is None and row["pres_se"] == 0.0


def test_every_metric_matches_a_hand_computation(models, tmp_path):
    photos = write_images(tmp_path / "pool", 9, size=SIDE, seed=6)
    refs = tmp_path / "refs"
    refs.mkdir()
    for photo in photos[:4]:
        (refs / photo.name).write_bytes(photo.read_bytes())
    subject = {"a photo of miru cat": photos[:4], "a photo of miru cat by the sea": photos[4:7]}
    write_samples(tmp_path / "samples", {
        (30, 6.0): {**subject, CLASS_PROMPT: photos[7:9]},
        (50, 12.0): {"a photo of miru cat": photos[1:3], CLASS_PROMPT: [photos[0]]},
    })
    rows = evaluate_samples(tmp_path / "samples", refs, models, class_prompt=CLASS_PROMPT, batch_size=3)
    json.dumps(rows)  # plain JSON-able values
    assert [(r["steps"], r["guidance"], r["prompt"], r["n"]) for r in rows] == [
        (30, 6.0, "a photo of miru cat", 4), (30, 6.0, "a photo of miru cat by the sea", 3),
        (50, 12.0, "a photo of miru cat", 2)]

    ref_dino = image_embeddings(models, load(photos[:4]), "dino")
    ref_clip = image_embeddings(models, load(photos[:4]), "clip")
    class_pres = {30: [mean_pairwise_cosine(image_embeddings(models, load([p]), "dino"), ref_dino)
                       for p in photos[7:9]],
                  50: [mean_pairwise_cosine(image_embeddings(models, load([photos[0]]), "dino"), ref_dino)]}
    for row in rows:
        sources = subject[row["prompt"]] if row["steps"] == 30 else photos[1:3]
        dino = image_embeddings(models, load(sources), "dino")
        clip = image_embeddings(models, load(sources), "clip")
        text = text_embeddings(models, [row["prompt"]])[0]
        per_image = {"dino": (dino @ ref_dino.T).mean(1), "clip_i": (clip @ ref_clip.T).mean(1), "clip_t": clip @ text}
        for name, values in per_image.items():
            assert row[name] == pytest.approx(float(values.mean()), abs=1e-5), name
            expected_se = float(values.std(unbiased=True)) / math.sqrt(len(sources))
            assert row[f"{name}_se"] == pytest.approx(expected_se, abs=1e-5)
        distances = [1 - float(dino[i] @ dino[j]) for i, j in itertools.combinations(range(len(sources)), 2)]
        assert row["div"] == pytest.approx(statistics.fmean(distances), abs=1e-5)
        assert row["div_se"] == pytest.approx(standard_error(distances), abs=1e-6)
        assert row["pres"] == pytest.approx(statistics.fmean(class_pres[row["steps"]]), abs=1e-5)
        assert row["pres_se"] == pytest.approx(standard_error(class_pres[row["steps"]]), abs=1e-6)
    # References == samples: CLIP-I of the first prompt is the mean of the whole reference similarity matrix.
    assert rows[0]["clip_i"] == pytest.approx(float((ref_clip @ ref_clip.T).mean()), abs=1e-5)


def test_each_file_is_embedded_once_across_calls(models, tmp_path):
    photos = write_images(tmp_path / "refs", 2, size=SIDE, seed=7)
    write_samples(tmp_path / "samples", {(30, 6.0): {"a photo of miru cat": [photos[0], photos[1], photos[0]]}})
    batches: list[int] = []  # images per DINO forward pass, seen by a hook on the real model
    hook = models.dino.embeddings.register_forward_hook(lambda module, args, out: batches.append(out.shape[0]))
    try:
        evaluate_samples(tmp_path / "samples", tmp_path / "refs", models, batch_size=2)
        first = list(batches)
        evaluate_samples(tmp_path / "samples", tmp_path / "refs", models, batch_size=2)
        second = list(batches)
        # A file rewritten under the same name is embedded again.
        flipped = Image.open(photos[1]).transpose(Image.FLIP_LEFT_RIGHT)
        flipped.save(tmp_path / "samples" / "images" / "s30-g6-p0-seed2.png")
        evaluate_samples(tmp_path / "samples", tmp_path / "refs", models, batch_size=2)
    finally:
        hook.remove()
    assert sum(first) == 2 + 3  # two references and three sample files, each once
    assert second == first  # the second call found every embedding in the cache
    assert sum(batches) == 2 + 3 + 1


def test_a_clip_folder_serves_as_the_dino_model(clip_folder, tmp_path):
    both = load_embedding_models(str(clip_folder), str(clip_folder), device="cpu")
    images = load(write_images(tmp_path, 2, size=SIDE, seed=8))
    assert both.dino_is_clip
    torch.testing.assert_close(image_embeddings(both, images, "dino"), image_embeddings(both, images, "clip"))


def test_a_clip_folder_without_preprocessor_config_uses_the_minus_one_to_one_range(clip_folder, tmp_path):
    """Like the miniature world's world-CLIP: pixels squashed to the model's size in [-1, 1]."""
    bare = tmp_path / "bare-clip"
    bare.mkdir()
    for file in clip_folder.iterdir():
        if file.is_file() and file.name != "preprocessor_config.json":
            (bare / file.name).write_bytes(file.read_bytes())
    world = load_embedding_models(str(bare), str(bare), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image.resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        want = world.clip.get_image_features(pixel_values=pixels.permute(2, 0, 1)[None]).pooler_output
    torch.testing.assert_close(image_embeddings(world, [image], "dino"), torch.nn.functional.normalize(want, dim=-1),
                               atol=2e-3, rtol=1e-3)


def test_unloadable_models_are_user_errors_naming_the_flag(clip_folder, dino_folder, tmp_path):
    with pytest.raises(UserError, match="--clip-model"):
        load_embedding_models(str(tmp_path / "missing"), str(dino_folder))
    with pytest.raises(UserError, match="--dino-model"):
        load_embedding_models(str(clip_folder), str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--clip-model .*not a CLIP model"):  # a ViT has no text tower
        load_embedding_models(str(dino_folder), str(dino_folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--dino-model .*config.json"):
        load_embedding_models(str(clip_folder), str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--clip-model no-such-owner/no-such-model"):  # offline in tests
        load_embedding_models("no-such-owner/no-such-model", str(dino_folder))


def test_samples_folder_without_manifest_is_a_user_error(models, tmp_path):
    write_images(tmp_path / "refs", 1, size=SIDE)
    write_images(tmp_path / "samples" / "images", 2, size=SIDE)
    with pytest.raises(UserError, match="manifest.jsonl"):
        evaluate_samples(tmp_path / "samples", tmp_path / "refs", models)
    (tmp_path / "samples" / "manifest.jsonl").write_text(json.dumps(
        {"file": "images/gone.png", "prompt": "p", "steps": 1, "guidance": 1.0, "scheduler": "ddim"}) + "\n")
    with pytest.raises(UserError, match="gone.png"):
        evaluate_samples(tmp_path / "samples", tmp_path / "refs", models)


def test_evaluate_writes_metrics_jsonl_and_prints_a_table(models, clip_folder, dino_folder, tmp_path, capsys):
    photos = write_images(tmp_path / "refs", 3, size=SIDE, seed=9)
    write_samples(tmp_path / "samples", {(30, 6.0): {"a photo of miru cat": photos[:2], CLASS_PROMPT: photos[2:]}})
    config = EvaluateConfig(samples=str(tmp_path / "samples"), reference_dir=str(tmp_path / "refs"),
                            class_prompt=CLASS_PROMPT, clip_model=str(clip_folder), dino_model=str(dino_folder))
    path = evaluate(config)
    assert path == tmp_path / "samples" / "metrics.jsonl"
    written = [json.loads(line) for line in path.read_text().splitlines()]
    expected = evaluate_samples(tmp_path / "samples", tmp_path / "refs", models, class_prompt=CLASS_PROMPT)
    assert len(written) == 1 and written[0].keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert written[0][key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key
    assert "a photo of miru cat" in capsys.readouterr().out
    config.output = str(tmp_path / "elsewhere" / "m.jsonl")
    assert evaluate(config) == tmp_path / "elsewhere" / "m.jsonl" and (tmp_path / "elsewhere" / "m.jsonl").is_file()


def test_metrics_imports_without_diffusers():
    """`evaluate` reads the manifest name from dreambooth.files, so measuring never loads the generator's library."""
    code = "import sys, dreambooth.metrics; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
