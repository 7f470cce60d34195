"""The miniature world: a seeded renderer of 64x64 RGB scenes and their captions.

A scene is one object (a cat, a dog, a rabbit, a bird or a car) of one colour, in one place, drawn
with flat cartoon shapes and a dark outline. Everything random about an image lives in a `SceneSpec`,
so `render(spec)` is a pure function and a spec plus its caption is the whole ground truth.

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

SIZE = 64
KINDS = ("cat", "dog", "rabbit", "bird", "car")
ANIMALS = ("cat", "dog", "rabbit")  # kinds that can wear markings
COLOURS = {
    "white": (238, 238, 232),
    "black": (34, 34, 38),
    "red": (206, 38, 38),
    "blue": (40, 80, 214),
    "green": (40, 168, 60),
    "yellow": (240, 206, 40),
    "brown": (128, 78, 38),
    "gray": (128, 128, 132),
}
# Marking colours include orange and pink, which no body ever has.
MARKING_COLOURS = {
    "orange": (250, 132, 20),
    "blue": (40, 80, 214),
    "black": (34, 34, 38),
    "red": (206, 38, 38),
    "green": (40, 168, 60),
    "pink": (246, 140, 190),
}
SCENES = ("by the sea", "in the forest", "in the snow", "in the desert", "at night", "in the city", "in a room")
POSES = ("standing", "sitting")
MIRU_MARKINGS = {"ears": "orange", "collar": "blue", "tail": "black"}
OUTLINE = (20, 20, 24)


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
            marks = {p: c for p, c in zip(("ears", "collar", "tail"), (rng.choice(list(MARKING_COLOURS)) for _ in range(3)))
                     if rng.random() < 0.6}
        marks = {p: (c if c is None or MARKING_COLOURS[c] != COLOURS[animal.colour] else None) for p, c in marks.items()}
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


# ----------------------------------------------------------------------------------------------
# Backgrounds


def _background(scene: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    horizon = rng.randint(26, 34)

    def jitter(c: tuple[int, int, int], k: int = 10) -> tuple[int, int, int]:
        return tuple(max(0, min(255, v + rng.randint(-k, k))) for v in c)

    if scene == "by the sea":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((150, 205, 245)))
        sea_end = horizon + rng.randint(10, 14)
        d.rectangle((0, horizon, SIZE, sea_end), fill=jitter((30, 100, 190)))
        for _ in range(5):
            x, y = rng.randint(0, SIZE), rng.randint(horizon + 2, sea_end - 2)
            d.line((x, y, x + rng.randint(4, 9), y), fill=(220, 235, 250))
        d.rectangle((0, sea_end, SIZE, SIZE), fill=jitter((236, 212, 150)))
        sx = rng.randint(4, 50)
        d.ellipse((sx, 4, sx + 10, 14), fill=(255, 240, 120))
    elif scene == "in the forest":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((175, 215, 170)))
        for _ in range(6):
            x = rng.randint(-4, SIZE)
            w = rng.randint(8, 14)
            d.rectangle((x + w // 2 - 1, horizon - 8, x + w // 2 + 2, horizon + 2), fill=(92, 60, 30))
            d.polygon([(x, horizon - 6), (x + w, horizon - 6), (x + w // 2, rng.randint(2, 12))], fill=jitter((20, 100, 40)))
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((70, 140, 50)))
    elif scene == "in the snow":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((200, 212, 228)))
        for _ in range(2):
            x = rng.randint(-10, 50)
            d.polygon([(x, horizon), (x + 30, horizon), (x + 15, horizon - rng.randint(10, 18))], fill=(150, 160, 180))
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((250, 250, 252), 4))
        for _ in range(18):
            x, y = rng.randint(0, SIZE - 1), rng.randint(0, SIZE - 1)
            d.point((x, y), fill=(255, 255, 255))
    elif scene == "in the desert":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((120, 190, 245)))
        d.ellipse((6, 4, 18, 16), fill=(255, 230, 80))
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((222, 170, 90)))
        for _ in range(rng.randint(1, 2)):
            x = rng.choice([rng.randint(2, 12), rng.randint(50, 60)])
            d.rectangle((x, horizon - 12, x + 3, horizon + 4), fill=(50, 130, 50))
            d.rectangle((x - 4, horizon - 7, x - 1, horizon - 5), fill=(50, 130, 50))
    elif scene == "at night":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((12, 16, 50), 6))
        for _ in range(14):
            x, y = rng.randint(0, SIZE - 1), rng.randint(0, horizon - 2)
            d.point((x, y), fill=(250, 250, 200))
        mx = rng.randint(6, 50)
        d.ellipse((mx, 4, mx + 9, 13), fill=(245, 245, 210))
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((28, 34, 48), 6))
    elif scene == "in the city":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((170, 190, 210)))
        x = -rng.randint(0, 6)
        while x < SIZE:
            w, top = rng.randint(9, 15), rng.randint(2, horizon - 8)
            d.rectangle((x, top, x + w - 1, horizon), fill=jitter((95, 95, 110), 16))
            for wy in range(top + 3, horizon - 2, 5):
                for wx in range(x + 2, x + w - 3, 4):
                    d.rectangle((wx, wy, wx + 1, wy + 1), fill=(250, 220, 110))
            x += w + 1
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((70, 70, 76), 6))
        d.line((0, horizon + 12, SIZE, horizon + 12), fill=(230, 230, 230))
    elif scene == "in a room":
        d.rectangle((0, 0, SIZE, horizon), fill=jitter((232, 218, 190), 6))
        d.rectangle((0, horizon, SIZE, SIZE), fill=jitter((160, 110, 70), 6))
        for y in range(horizon + 5, SIZE, 6):
            d.line((0, y, SIZE, y), fill=(135, 90, 55))
    else:
        raise ValueError(f"unknown scene {scene!r}; known: {SCENES}")
    return img


# ----------------------------------------------------------------------------------------------
# Objects: shapes in object units (x to the right of the centre, y up from the feet), then placed.


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * f))) for v in c)


def _draw_object(d: ImageDraw.ImageDraw, spec: SceneSpec) -> None:
    s, sign = spec.size, (-1 if spec.flip else 1)
    body = COLOURS[spec.colour]
    ears = MARKING_COLOURS[spec.ears] if spec.ears else body
    tail = MARKING_COLOURS[spec.tail] if spec.tail else body

    def P(x: float, y: float) -> tuple[float, float]:
        return spec.x + sign * x * s, spec.ground - y * s

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        (ax, ay), (bx, by) = P(x0, y0), P(x1, y1)
        return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)

    def ell(x0, y0, x1, y1, fill):
        d.ellipse(box(x0, y0, x1, y1), fill=fill, outline=OUTLINE)

    def rect(x0, y0, x1, y1, fill):
        d.rectangle(box(x0, y0, x1, y1), fill=fill, outline=OUTLINE)

    def poly(points, fill):
        d.polygon([P(x, y) for x, y in points], fill=fill, outline=OUTLINE)

    def line(points, fill, width):
        d.line([P(x, y) for x, y in points], fill=fill, width=max(1, round(width * s)))

    sit = spec.pose == "sitting"
    if spec.kind == "cat":
        if sit:
            line([(-8, 2), (-15, 3), (-17, 10)], OUTLINE, 6)
            line([(-8, 2), (-15, 3), (-17, 10)], tail, 4)
            ell(-9, 0, 9, 20, body)
            hx, hy = 1, 24
        else:
            line([(-11, 10), (-17, 16), (-16, 24)], OUTLINE, 6)
            line([(-11, 10), (-17, 16), (-16, 24)], tail, 4)
            for lx in (-9, -4, 4, 9):
                rect(lx - 1.5, 0, lx + 1.5, 8, body)
            ell(-13, 5, 12, 17, body)
            hx, hy = 10, 19
        poly([(hx - 7, hy + 4), (hx - 6, hy + 14), (hx - 1, hy + 7)], ears)
        poly([(hx + 7, hy + 4), (hx + 6, hy + 14), (hx + 1, hy + 7)], ears)
        ell(hx - 7.5, hy - 6, hx + 7.5, hy + 8, body)
        d.point(P(hx + 2.5, hy + 2), fill=OUTLINE)
        d.point(P(hx - 2.5, hy + 2), fill=OUTLINE)
    elif spec.kind == "dog":
        tail_line = [(-8, 8), (-14, 14)] if sit else [(-12, 12), (-17, 20)]
        line(tail_line, OUTLINE, 5)
        line(tail_line, tail, 3)
        if sit:
            ell(-9, 0, 10, 19, body)
            hx, hy = 3, 22
        else:
            for lx in (-10, -5, 5, 10):
                rect(lx - 2, 0, lx + 2, 10, body)
            ell(-15, 7, 14, 19, body)
            hx, hy = 12, 20
        ell(hx - 7, hy - 5, hx + 7, hy + 8, body)
        ell(hx + 3, hy - 5, hx + 12, hy + 2, _shade(body, 0.92))
        ell(hx + 10, hy - 1, hx + 13, hy + 2, OUTLINE)
        ear = ears if spec.ears else _shade(body, 0.7)
        ell(hx - 9, hy - 6, hx - 3, hy + 7, ear)
    elif spec.kind == "rabbit":
        ell(-13, 2, -7, 8, tail)
        ell(-11, 0, 9, 16 if not sit else 18, body)
        hx, hy = (8, 18) if not sit else (3, 22)
        ell(hx - 5, hy + 3, hx - 1, hy + 20, ears)
        ell(hx + 1, hy + 3, hx + 5, hy + 20, ears)
        ell(hx - 6, hy - 5, hx + 6, hy + 7, body)
        d.point(P(hx + 2, hy + 2), fill=OUTLINE)
    elif spec.kind == "bird":
        line([(-3, 0), (-3, 6)], OUTLINE, 1)
        line([(3, 0), (3, 6)], OUTLINE, 1)
        poly([(-9, 12), (-17, 18 if sit else 10), (-15, 6 if sit else 16)], _shade(body, 0.8))
        ell(-11, 4, 8, 20, body)
        ell(1, 14, 13, 26, body)
        poly([(12, 22), (18, 20), (12, 18)], (250, 160, 30))
        ell(-6, 9, 4, 15, _shade(body, 0.75))
        d.point(P(8, 21), fill=OUTLINE)
    elif spec.kind == "car":
        for wx in (-10, 10):
            ell(wx - 5, -1, wx + 5, 9, OUTLINE)
            ell(wx - 2, 2, wx + 2, 6, (170, 170, 170))
        rect(-18, 4, 18, 14, body)
        top = 22 if not sit else 20  # 'pose' of a car: a taller or lower cabin
        poly([(-11, 14), (-7, top), (8, top), (12, 14)], body)
        rect(-6, 15, 0, top - 2, (180, 220, 250))
        rect(2, 15, 8, top - 2, (180, 220, 250))
    else:
        raise ValueError(f"unknown kind {spec.kind!r}; known: {KINDS}")

    if spec.collar and spec.kind in ANIMALS:
        # A thick band where the head meets the body: 3-4 px, so it survives the VAE's 4x downsampling.
        c = MARKING_COLOURS[spec.collar]
        cx, cy = hx, hy - (6 if spec.kind == "cat" else 5)
        line([(cx - 6, cy + 1), (cx + 6, cy - 1)], OUTLINE, 5)
        line([(cx - 6, cy + 1), (cx + 6, cy - 1)], c, 3.5)


def render(spec: SceneSpec) -> np.ndarray:
    """The 64x64x3 uint8 image of a spec."""
    img = _background(spec.scene, spec.background_seed)
    _draw_object(ImageDraw.Draw(img), spec)
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
    background = np.asarray(_background(spec.scene, spec.background_seed)).astype(np.int16)
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
