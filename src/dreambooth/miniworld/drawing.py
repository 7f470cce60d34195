"""How the miniature world looks: the canvas, the palette, and the drawing of its scenes and objects.

`world.py` decides what is in a picture (a `SceneSpec`) and what it is called; this module only draws a
spec, with flat cartoon shapes and a dark outline. Nothing here is random except through the spec's
`background_seed`, so a spec always draws the same pixels.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from dreambooth.miniworld.world import SceneSpec

SIZE = 64
KINDS = ("cat", "dog", "rabbit", "bird", "car")
ANIMALS = ("cat", "dog", "rabbit")  # kinds that can wear markings: ears, a neck and a tail to draw them on
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
OUTLINE = (20, 20, 24)


def draw_background(scene: str, seed: int) -> Image.Image:
    """The empty scene: its own seeded RNG, so the same (scene, seed) is always the same picture."""
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
            d.polygon([(x, horizon - 6), (x + w, horizon - 6), (x + w // 2, rng.randint(2, 12))],
                      fill=jitter((20, 100, 40)))
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


def draw_object(d: ImageDraw.ImageDraw, spec: SceneSpec) -> None:
    """The spec's object, with its markings, over whatever `d` already holds."""
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
