"""The procedural "shapes world": one shape on a plain background, in a plain look or an artist's style.

Prompts have the form `a {color} {shape} on a {background} background`. Everything is deterministic from a seed.
Images are drawn at 4x and downsampled, so edges are antialiased like real pictures.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (247, 140, 30),
    "yellow": (240, 214, 40),
    "green": (44, 160, 64),
    "blue": (36, 84, 214),
    "purple": (140, 64, 190),
    "white": (246, 246, 244),
    "black": (24, 24, 26),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
STYLES = ("plain", "ink", "halftone")
# looks the base model does learn, each named in its caption, so that it knows how to draw texture at all (as any
# real base model does) without ever seeing the artists' styles above: no black outlines, cross-hatching or dot grids
DECORATIONS: dict[str, str] = {
    "striped": "with stripes",
    "gradient": "with a gradient",
    "outlined": "with an outline",
    "speckled": "with speckles",
}
SIZE = 64
SCALE = 4


@dataclass(frozen=True)
class Scene:
    """What one image shows: a colored shape on a background, placed and sized, in a style."""

    color: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float
    angle: float
    style: str = "plain"

    @property
    def prompt(self) -> str:
        """The caption of the scene (decorated looks say so at the end)."""
        caption = f"a {self.color} {self.shape} on a {self.background} background"
        return f"{caption}, {DECORATIONS[self.style]}" if self.style in DECORATIONS else caption


def random_scene(
    rng: random.Random,
    style: str = "plain",
    color: str | None = None,
    shape: str | None = None,
    background: str | None = None,
) -> Scene:
    """A random scene (the given attributes fixed); the background never has the shape's color."""
    color = color or rng.choice(list(COLORS))
    shape = shape or rng.choice(SHAPES)
    background = background or rng.choice([c for c in COLORS if c != color])
    if background == color:
        raise ValueError("background must differ from the shape's color")
    radius = rng.uniform(13, 24)
    margin = radius + 3
    return Scene(
        color,
        shape,
        background,
        rng.uniform(margin, SIZE - margin),
        rng.uniform(margin, SIZE - margin),
        radius,
        rng.uniform(-0.35, 0.35),
        style,
    )


def _polygon(scene: Scene, points: int, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices (at drawing scale) of a regular polygon or, with `inner`, a star."""
    out = []
    count = points * (2 if inner else 1)
    for k in range(count):
        r = scene.radius * (inner if inner and k % 2 else 1.0)
        a = scene.angle - math.pi / 2 + 2 * math.pi * k / count
        out.append(((scene.cx + r * math.cos(a)) * SCALE, (scene.cy + r * math.sin(a)) * SCALE))
    return out


def shape_mask(scene: Scene) -> Image.Image:
    """The shape as a white-on-black 'L' mask at drawing scale (4x)."""
    mask = Image.new("L", (SIZE * SCALE, SIZE * SCALE), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = scene.cx * SCALE, scene.cy * SCALE, scene.radius * SCALE
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif scene.shape == "square":
        draw.polygon(
            _polygon(Scene(**{**scene.__dict__, "radius": scene.radius * 1.05, "angle": scene.angle + math.pi / 4}), 4),
            fill=255,
        )
    elif scene.shape == "triangle":
        draw.polygon(_polygon(Scene(**{**scene.__dict__, "radius": scene.radius * 1.15}), 3), fill=255)
    elif scene.shape == "star":
        draw.polygon(_polygon(Scene(**{**scene.__dict__, "radius": scene.radius * 1.15}), 5, inner=0.45), fill=255)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return mask


def _tint(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Mix `rgb` towards white (amount > 0) or black (amount < 0)."""
    target = 255 if amount > 0 else 0
    return tuple(int(round(c + (target - c) * abs(amount))) for c in rgb)


def _hatching(size: int, spacing: int, width: int, cross: bool, fill: tuple[int, int, int]) -> Image.Image:
    """Diagonal hatching lines (and the crossing set) on a transparent layer."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for offset in range(-size, 2 * size, spacing):
        draw.line([(offset, 0), (offset + size, size)], fill=(*fill, 255), width=width)
        if cross:
            draw.line([(offset + size, 0), (offset, size)], fill=(*fill, 255), width=width)
    return layer


def _dots(size: int, spacing: int, radius: float, fill: tuple[int, int, int], shift: bool = True) -> Image.Image:
    """A halftone dot grid (rows offset by half a period) on a transparent layer."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for row, y in enumerate(range(0, size + spacing, spacing)):
        x0 = spacing // 2 if shift and row % 2 else 0
        for x in range(x0, size + spacing, spacing):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(*fill, 255))
    return layer


def _band(mask: Image.Image, outside: int, inside: int) -> Image.Image:
    """An outline band: the mask grown by `outside` minus the mask shrunk by `inside` (odd filter sizes)."""
    grown = np.asarray(mask.filter(ImageFilter.MaxFilter(outside)), dtype=np.int16)
    shrunk = np.asarray(mask.filter(ImageFilter.MinFilter(inside)) if inside > 1 else mask, dtype=np.int16)
    return Image.fromarray(np.clip(grown - shrunk, 0, 255).astype(np.uint8))


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image."""
    big = SIZE * SCALE
    background = COLORS[scene.background]
    color = COLORS[scene.color]
    mask = shape_mask(scene)
    if scene.style == "plain":
        canvas = Image.new("RGB", (big, big), background)
        canvas.paste(Image.new("RGB", (big, big), color), mask=mask)
    elif scene.style == "ink":
        # an ink illustrator: pale paper-tinted background with sparse hatching, cross-hatched fill, thick outline
        canvas = Image.new("RGB", (big, big), background)
        shade = (20, 20, 20) if scene.background != "black" else (90, 90, 90)
        canvas.paste(_hatching(big, 44, 4, False, shade), mask=_hatching(big, 44, 4, False, shade))
        fill = Image.new("RGB", (big, big), color)
        ink = (15, 15, 15) if scene.color != "black" else (110, 110, 110)
        hatch = _hatching(big, 22, 5, True, ink)
        fill.paste(hatch, mask=hatch)
        canvas.paste(fill, mask=mask)
        canvas.paste(Image.new("RGB", (big, big), (10, 10, 10)), mask=_band(mask, 13, 9))
    elif scene.style == "halftone":
        # pop-art print: the shape in big dots over a light tint, the background in small dark dots
        canvas = Image.new("RGB", (big, big), background)
        bg_dots = _dots(big, 32, 5, _tint(background, -0.45 if scene.background != "black" else 0.35))
        canvas.paste(bg_dots, mask=bg_dots)
        fill = Image.new("RGB", (big, big), _tint(color, 0.6) if scene.color != "white" else (200, 200, 200))
        dots = _dots(big, 28, 11, color if scene.color != "white" else (255, 255, 255))
        fill.paste(dots, mask=dots)
        canvas.paste(fill, mask=mask)
        canvas.paste(Image.new("RGB", (big, big), (20, 20, 20)), mask=_band(mask, 7, 1))
    elif scene.style in DECORATIONS:
        canvas = _decorated(scene, mask)
    else:
        raise ValueError(f"unknown style {scene.style!r}")
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _decorated(scene: Scene, mask: Image.Image) -> Image.Image:
    """A plain scene with one base-corpus decoration; its details (angles, spacings, tints) follow from the scene."""
    big = SIZE * SCALE
    rng = random.Random(repr(scene))
    background, color = COLORS[scene.background], COLORS[scene.color]
    canvas = Image.new("RGB", (big, big), background)
    fill = Image.new("RGB", (big, big), color)
    if scene.style == "gradient":
        a = np.array(background, float)
        b = np.array(_tint(background, rng.choice([-0.5, 0.5])), float)
        t = np.linspace(0, 1, big)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        canvas = Image.fromarray(((a * (1 - t) + b * t) * np.ones((big, big, 1))).astype(np.uint8))
    elif scene.style == "speckled":
        cells = rng.choice([16, 32])
        speckle = np.random.default_rng(rng.randrange(2**32)).random((cells, cells)) < 0.25
        layer_mask = Image.fromarray((speckle * 255).astype(np.uint8)).resize((big, big), Image.Resampling.NEAREST)
        shade = _tint(background, -0.35 if scene.background != "black" else 0.35)
        canvas.paste(Image.new("RGB", (big, big), shade), mask=layer_mask)
    elif scene.style == "striped":
        shade = _tint(color, 0.45 if scene.color != "white" else -0.25)
        stripes = _hatching(big * 2, rng.randrange(14, 40), rng.randrange(4, 14), False, shade)
        stripes = stripes.rotate(rng.uniform(0, 180)).crop((big // 2, big // 2, big // 2 + big, big // 2 + big))
        fill.paste(stripes, mask=stripes)
    canvas.paste(fill, mask=mask)
    if scene.style == "outlined":
        others = [c for name, c in COLORS.items() if name not in (scene.color, scene.background, "black")]
        canvas.paste(Image.new("RGB", (big, big), rng.choice(others)), mask=_band(mask, rng.choice([9, 11]), 1))
    return canvas


def scenes(seed: int, count: int, style: str = "plain", exclude: set[tuple[str, str]] | None = None) -> list[Scene]:
    """`count` random scenes from `seed`, skipping (color, shape) pairs in `exclude`."""
    rng = random.Random(f"scenes:{seed}:{style}")
    out = []
    while len(out) < count:
        scene = random_scene(rng, style)
        if exclude and (scene.color, scene.shape) in exclude:
            continue
        out.append(scene)
    return out


# ---------------------------------------------------------------------------------------------- the VAE's corpus


def texture_image(rng: random.Random) -> Image.Image:
    """A broad procedural picture for the autoencoder: gradients, stripes, dots, hatching, outlines, noise, shapes."""
    big = SIZE * SCALE
    kind = rng.choice(["gradient", "stripes", "dots", "hatching", "outlines", "noise", "mixed", "mixed", "shape"])

    def color() -> tuple[int, int, int]:
        if rng.random() < 0.5:
            return rng.choice(list(COLORS.values()))
        return tuple(rng.randrange(256) for _ in range(3))

    if kind == "noise":
        scale = rng.choice([4, 8, 16])
        small = np.array([[color() for _ in range(SIZE // scale)] for _ in range(SIZE // scale)], dtype=np.uint8)
        return Image.fromarray(small).resize(
            (SIZE, SIZE), rng.choice([Image.Resampling.NEAREST, Image.Resampling.BILINEAR])
        )
    canvas = Image.new("RGB", (big, big), color())
    if kind == "gradient" or kind == "mixed":
        a, b = np.array(color(), float), np.array(color(), float)
        t = np.linspace(0, 1, big)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, big)[:, None, None]
        grad = (a * (1 - t) + b * t) * np.ones((big, big, 1))
        canvas = Image.fromarray(grad.astype(np.uint8))
    if kind in ("stripes", "mixed"):
        layer = _hatching(big, rng.randrange(12, 60), rng.randrange(3, 20), rng.random() < 0.3, color())
        if rng.random() < 0.5:
            layer = layer.rotate(rng.uniform(0, 180))
        canvas.paste(layer, mask=layer)
    if kind in ("dots", "mixed"):
        layer = _dots(big, rng.randrange(16, 64), rng.uniform(3, 14), color(), rng.random() < 0.7)
        canvas.paste(layer, mask=layer)
    if kind in ("hatching", "mixed"):
        layer = _hatching(big, rng.randrange(14, 40), rng.randrange(3, 8), rng.random() < 0.6, color())
        canvas.paste(layer, mask=layer)
    if kind in ("outlines", "shape", "mixed"):
        for _ in range(rng.randint(1, 3)):
            scene = random_scene(rng)
            scene = Scene(**{**scene.__dict__, "radius": scene.radius * rng.uniform(0.5, 1.0)})
            mask = shape_mask(scene)
            if kind == "outlines":
                canvas.paste(Image.new("RGB", (big, big), color()), mask=_band(mask, rng.choice([5, 9, 13]), 1))
                continue
            fill = Image.new("RGB", (big, big), color())
            pattern = rng.choice([None, "stripes", "dots"])
            if pattern == "stripes":
                layer = _hatching(big, rng.randrange(14, 40), rng.randrange(3, 8), rng.random() < 0.5, color())
            elif pattern == "dots":
                layer = _dots(big, rng.randrange(16, 40), rng.uniform(4, 12), color())
            if pattern:
                fill.paste(layer, mask=layer)
            canvas.paste(fill, mask=mask)
            if rng.random() < 0.4:
                canvas.paste(Image.new("RGB", (big, big), color()), mask=_band(mask, rng.choice([5, 9, 13]), 1))
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def to_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 array of an RGB image."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# (color, shape) pairs that no style dataset contains: the style benchmark draws them to test generalisation
HELD_OUT_PAIRS = {
    ("red", "star"),
    ("blue", "ring"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "ring"),
    ("black", "star"),
    ("white", "triangle"),
}
