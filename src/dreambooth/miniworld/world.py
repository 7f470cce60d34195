"""The miniature world: a seeded renderer of 64x64 RGB scenes and their captions.

A scene is one object (a cat, a dog, a rabbit, a bird or a car) of one colour, in one place, drawn
with flat cartoon shapes and a dark outline (`drawing.py`). Everything random about an image lives in a
`SceneSpec`, so `render(spec)` is a pure function and a spec plus its caption is the whole ground truth.

Markings (ear, collar and tail colours that differ from the body) exist in the world but the
generator's pretraining data never contains them (`sample_spec(..., marking_rate=0.0)`); only the
world-CLIP sees them. Miru, the DreamBooth subject, is a white cat with orange ears, a blue collar and
a black tail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# What can be drawn (kinds, scenes, poses, colours, the image size) is defined beside the drawing code;
# the world's callers keep reading these names from here.
from .drawing import SIZE  # noqa: F401
from .drawing import ANIMALS, COLOURS, KINDS, MARKING_COLOURS, POSES, SCENES, draw_background, draw_object

MIRU_MARKINGS = {"ears": "orange", "collar": "blue", "tail": "black"}


@dataclass(frozen=True)
class SceneSpec:
    """Everything that decides one image; `render(spec)` is deterministic."""

    kind: str
    colour: str
    scene: str
    x: float  # horizontal centre of the object, pixels
    ground: float  # y of the object's feet, pixels
    size: float  # scale; 1.0 is a body about 26 px wide
    pose: str
    flip: bool
    background_seed: int
    ears: str | None = None  # marking colours; None means same as the body
    collar: str | None = None
    tail: str | None = None

    @property
    def has_markings(self) -> bool:
        return any(m is not None for m in (self.ears, self.collar, self.tail))


# ----------------------------------------------------------------------------------------------
# Sampling specs and captions


def sample_spec(rng: random.Random, kind: str | None = None, colour: str | None = None, scene: str | None = None,
                marking_rate: float = 0.0) -> SceneSpec:
    """Draw a random scene; arguments fix parts of it. marking_rate > 0 only for world-CLIP data."""
    kind = kind or rng.choice(KINDS)
    spec = SceneSpec(
        kind=kind,
        colour=colour or rng.choice(list(COLOURS)),
        scene=scene or rng.choice(SCENES),
        x=rng.uniform(22, 42),
        ground=rng.uniform(50, 58),
        size=rng.uniform(0.85, 1.2),
        pose=rng.choice(POSES),
        flip=rng.random() < 0.5,
        background_seed=rng.getrandbits(31),
    )
    if kind in ANIMALS and rng.random() < marking_rate:
        parts = {p: rng.choice(list(MARKING_COLOURS)) for p in ("ears", "collar", "tail") if rng.random() < 0.6}
        # A marking the same colour as the body is invisible, so it is not a marking.
        parts = {p: c for p, c in parts.items() if MARKING_COLOURS[c] != COLOURS[spec.colour]}
        spec = replace(spec, **parts)
    return spec


def look_alike_specs(rng: random.Random, n: int, marking_rate: float = 0.5) -> list[SceneSpec]:
    """n specs in groups of four: a scene, the same colour and place with another kind, the same animal
    with other markings, and a random scene. Contrastive batches of look-alikes teach the world-CLIP
    the fine distinctions (cat vs rabbit, miru vs a plain white cat) that random batches rarely pose."""
    specs: list[SceneSpec] = []
    while len(specs) < n:
        base = sample_spec(rng, marking_rate=marking_rate)
        other_kind = rng.choice([k for k in KINDS if k != base.kind])
        kind_twin = sample_spec(rng, kind=other_kind, colour=base.colour, scene=base.scene)
        if other_kind in ANIMALS:
            kind_twin = replace(kind_twin, ears=base.ears, collar=base.collar, tail=base.tail)
        animal = base if base.kind in ANIMALS else kind_twin if other_kind in ANIMALS else \
            sample_spec(rng, kind=rng.choice(ANIMALS), colour=base.colour, scene=base.scene)
        # Other markings: none if it had some, else fresh ones (miru's own set a third of the time).
        if animal.has_markings:
            marks = {"ears": None, "collar": None, "tail": None}
        elif rng.random() < 0.33:
            marks = dict(MIRU_MARKINGS)
        else:
            colours = (rng.choice(list(MARKING_COLOURS)) for _ in range(3))
            marks = {p: c for p, c in zip(("ears", "collar", "tail"), colours) if rng.random() < 0.6}
        marks = {p: (c if c is None or MARKING_COLOURS[c] != COLOURS[animal.colour] else None)
                 for p, c in marks.items()}
        marking_twin = replace(sample_spec(rng, kind=animal.kind, colour=animal.colour, scene=animal.scene), **marks)
        specs += [base, kind_twin, marking_twin, sample_spec(rng, marking_rate=marking_rate)]
    return specs[:n]


def miru_spec(rng: random.Random, scene: str = "in a room") -> SceneSpec:
    """Miru in a random pose; instance images use the plain indoor background."""
    return replace(sample_spec(rng, kind="cat", colour="white", scene=scene), **MIRU_MARKINGS)


def markings_phrase(spec: SceneSpec) -> str:
    """' with orange ears, a blue collar and a black tail' (empty when there are none)."""
    parts = []
    if spec.ears:
        parts.append(f"{spec.ears} ears")
    if spec.collar:
        parts.append(f"a {spec.collar} collar")
    if spec.tail:
        parts.append(f"a {spec.tail} tail")
    if not parts:
        return ""
    return " with " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def full_caption(spec: SceneSpec) -> str:
    """The canonical caption naming every attribute, markings included."""
    return f"a photo of a {spec.colour} {spec.kind}{markings_phrase(spec)} {spec.scene}"


# Shorter forms keep class prompts ("a photo of a cat") in the generator's training distribution.
CAPTION_FORMS = (
    ("a photo of a {colour} {kind} {scene}", 0.45),
    ("a photo of a {kind} {scene}", 0.12),
    ("a photo of a {colour} {kind}", 0.12),
    ("a photo of a {kind}", 0.1),
    ("a {colour} {kind} {scene}", 0.07),
    ("a {colour} {kind}", 0.07),
    ("a {kind} {scene}", 0.07),
)


def caption_forms(spec: SceneSpec) -> list[str]:
    """Every caption form for a marking-free spec, the full one first."""
    return [f.format(colour=spec.colour, kind=spec.kind, scene=spec.scene) for f, _ in CAPTION_FORMS]


def random_caption(spec: SceneSpec, rng: random.Random) -> str:
    """A caption form drawn by weight; all forms are true of the image."""
    forms, weights = zip(*CAPTION_FORMS)
    form = rng.choices(forms, weights=weights)[0]
    return form.format(colour=spec.colour, kind=spec.kind, scene=spec.scene)


def vocabulary() -> list[str]:
    """Every word the world's captions (generator and world-CLIP) use."""
    words = {"a", "photo", "of", "with", "and", "ears", "collar", "tail"}
    words.update(KINDS, COLOURS, MARKING_COLOURS)
    for scene in SCENES:
        words.update(scene.split())
    return sorted(words)


def render(spec: SceneSpec) -> np.ndarray:
    """The 64x64x3 uint8 image of a spec."""
    img = draw_background(spec.scene, spec.background_seed)
    draw_object(ImageDraw.Draw(img), spec)
    return np.asarray(img)


def render_batch(specs: list[SceneSpec]) -> np.ndarray:
    """N x 64 x 64 x 3 uint8."""
    return np.stack([render(s) for s in specs])


def sample_batch(rng: random.Random, n: int, marking_rate: float = 0.0) -> tuple[np.ndarray, list[SceneSpec]]:
    """n random images and their specs (generator data when marking_rate is 0)."""
    specs = [sample_spec(rng, marking_rate=marking_rate) for _ in range(n)]
    return render_batch(specs), specs


def render_mask(spec: SceneSpec) -> Image.Image:
    """The object's silhouette in `render(spec)`: 255 where the object (outline included) covers the
    background, grown by one pixel so anti-aliased edges count as the object."""
    background = np.asarray(draw_background(spec.scene, spec.background_seed)).astype(np.int16)
    covered = (np.abs(render(spec).astype(np.int16) - background).sum(axis=-1) > 0).astype(np.uint8) * 255
    return Image.fromarray(covered, mode="L").filter(ImageFilter.MaxFilter(3))


def miru_instance_specs(n: int = 5, seed: int = 0, scene: str = "in a room") -> list[SceneSpec]:
    """N poses of miru; the indoor background by default (the instance images)."""
    rng = random.Random(seed)
    return [miru_spec(rng, scene=scene) for _ in range(n)]


def miru_instance_images(n: int = 5, seed: int = 0, scene: str = "in a room") -> list[Image.Image]:
    """N photos of miru in varied poses; the indoor background by default (the instance images)."""
    return [Image.fromarray(render(spec)) for spec in miru_instance_specs(n, seed, scene)]


def save_instance_images(folder, n: int = 5, seed: int = 0, mask_folder=None) -> list:
    """Write miru's instance photos as PNGs (miru-00.png, ...) and return their paths; with `mask_folder`,
    also miru's silhouette in each, under the same names (for `train --instance-mask-dir`)."""
    from pathlib import Path

    folders = [Path(folder)] + ([Path(mask_folder)] if mask_folder is not None else [])
    for each in folders:
        each.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(miru_instance_specs(n, seed)):
        paths.append(Path(folder) / f"miru-{i:02d}.png")
        Image.fromarray(render(spec)).save(paths[-1])
        if mask_folder is not None:
            render_mask(spec).save(Path(mask_folder) / paths[-1].name)
    return paths


def to_tensor_range(images: np.ndarray) -> "np.ndarray":
    """uint8 NHWC -> float32 NCHW in [-1, 1], the range the VAE expects."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0
