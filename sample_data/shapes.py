"""The procedural "shapes world": one shape on a background, drawn plainly, in named looks, or in an artist's style.

Prompts have the form `a {color} {shape} on a {background} background`, followed by the named looks the picture has
(`..., with a thick outline, with cross-hatching, in pastel colors`). The base model learns every look, alone and in
twos and threes; an artist's style is a combination of looks with fixed parameters that the base never saw together
(as a real artist's style is new to Stable Diffusion while its lines, hatching, dots and palettes are not). Style
sets are captioned with the content only: the look is what the trigger word has to learn.

Every pattern repeats at least every two latent pixels (the autoencoder turns 4x4 pixels into one latent pixel):
stripes, hatching and dot grids every 8-15 pixels; shadows fall 5-6.5 pixels away; outlines are 4.5-5.5 pixels wide,
or 2-2.5 for the thin one (a line weight finer than a latent pixel, as real pictures have).
Everything is deterministic from a seed. Images are drawn at 4x and downsampled, so edges are antialiased.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class Look:
    """A named look the base model draws on request: its caption phrase and the slot it fills in a picture."""

    phrase: str
    slot: str  # fill, outline, background, shadow or palette: a picture has at most one look per slot


LOOKS: dict[str, Look] = {
    "stripes": Look("with stripes", "fill"),
    "cross_hatching": Look("with cross-hatching", "fill"),
    "big_dots": Look("with big dots", "fill"),
    "small_dots": Look("with small dots", "fill"),
    "thick_outline": Look("with a thick outline", "outline"),
    "thin_outline": Look("with a thin outline", "outline"),
    "gradient": Look("with a gradient", "background"),
    "paper": Look("on textured paper", "background"),
    "dotted_background": Look("with a dotted background", "background"),
    "hatched_background": Look("with a hatched background", "background"),
    "shadow": Look("with a shadow", "shadow"),
    "pastel": Look("in pastel colors", "palette"),
    "muted": Look("in muted colors", "palette"),
}
SLOTS = ("fill", "outline", "background", "shadow", "palette")
LOOKS_IN_SLOT = {slot: [name for name, look in LOOKS.items() if look.slot == slot] for slot in SLOTS}

# Artist styles: combinations of looks with fixed parameters. The base model's corpus never holds a style's
# combination, nor any picture with all but one of its looks. "poster" is kept out of every choice made while
# designing the demo model and its presets: it shows whether what works on the shipped styles works on a new one.
ARTIST_STYLES: dict[str, tuple[str, ...]] = {
    "ink": ("thick_outline", "cross_hatching", "hatched_background", "pastel"),
    "halftone": ("big_dots", "dotted_background", "thin_outline"),
    "poster": ("stripes", "shadow", "gradient", "muted"),
}
STYLE_PARAMETERS: dict[str, dict[str, float]] = {
    "ink": {"outline_width": 5.0, "hatch_period": 10.0, "hatch_width": 2.0, "background_period": 12.0},
    "halftone": {"dot_period": 14.0, "dot_radius": 4.5, "background_period": 10.0, "outline_width": 2.25},
    "poster": {"stripe_angle": 45.0, "stripe_period": 10.0, "shadow_offset": 5.5, "gradient_direction": 1.0},
}
STYLES = ("plain", *ARTIST_STYLES)
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
    style: str = "plain"  # "plain" (with the named `looks`) or an artist style
    looks: tuple[str, ...] = ()  # the looks of a plain scene, in caption order
    # looks drawn but left out of the caption, as real captions describe what a picture shows more often than how it
    # is drawn (not in the repr, which seeds the looks' parameters: the picture is the same either way)
    unnamed: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.style != "plain" and self.style not in ARTIST_STYLES:
            raise ValueError(f"unknown style {self.style!r}")
        unknown = [look for look in self.looks if look not in LOOKS]
        if unknown:
            raise ValueError(f"unknown look(s) {unknown}")
        slots = [LOOKS[look].slot for look in self.looks]
        if len(set(slots)) != len(slots):
            raise ValueError(f"looks {self.looks} fill one slot twice")
        if not set(self.unnamed) <= set(self.looks):
            raise ValueError(f"unnamed looks {self.unnamed} are not among the looks {self.looks}")

    @property
    def content(self) -> str:
        """What the picture shows, without how it is drawn."""
        return f"a {self.color} {self.shape} on a {self.background} background"

    @property
    def prompt(self) -> str:
        """The caption: the content, then each look it names; an artist's picture names no look."""
        return ", ".join([self.content, *(LOOKS[look].phrase for look in self.named_looks)])

    @property
    def named_looks(self) -> tuple[str, ...]:
        """The looks the caption names."""
        return tuple(look for look in self.looks if look not in self.unnamed)

    @property
    def drawn_looks(self) -> tuple[str, ...]:
        """The looks the picture is drawn with (an artist style's own, or the named ones)."""
        return ARTIST_STYLES[self.style] if self.style != "plain" else self.looks


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
    looks = scene.drawn_looks
    mask = shape_mask(scene)
    if not looks:
        canvas = Image.new("RGB", (big, big), COLORS[scene.background])
        canvas.paste(Image.new("RGB", (big, big), COLORS[scene.color]), mask=mask)
    else:
        canvas = _draw_looks(scene, looks, look_parameters(scene), mask)
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def look_parameters(scene: Scene) -> dict[str, float]:
    """Sizes, periods and directions of the looks: random per scene within each look's range, fixed for a style."""
    rng = random.Random(f"looks:{scene!r}")
    params = {
        "stripe_period": rng.uniform(9, 12),
        "stripe_angle": rng.choice([45.0, -45.0, 0.0, 90.0]),
        "hatch_period": rng.uniform(9, 11),
        "hatch_width": rng.uniform(1.75, 2.5),
        "dot_period": rng.uniform(13, 15) if "big_dots" in scene.drawn_looks else rng.uniform(7.5, 8.5),
        "dot_radius": rng.uniform(4, 4.75) if "big_dots" in scene.drawn_looks else rng.uniform(1.75, 2.25),
        "outline_width": rng.uniform(4.5, 5.5) if "thick_outline" in scene.drawn_looks else rng.uniform(2.0, 2.5),
        "background_period": rng.uniform(9, 13),
        "shadow_offset": rng.uniform(5, 6.5),
        "gradient_direction": float(rng.randrange(4)),
        "paper_seed": float(rng.randrange(2**31)),
    }
    params.update(STYLE_PARAMETERS.get(scene.style, {}))
    return params


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrast(rgb: tuple[int, int, int], lighter: float = 0.45, darker: float = 0.35) -> tuple[int, int, int]:
    """A shade of `rgb` that stands out from it: lighter for dark colors, darker for light ones."""
    return _tint(rgb, -darker) if _luma(rgb) > 150 else _tint(rgb, lighter)


def _palette(rgb: tuple[int, int, int], looks: tuple[str, ...]) -> tuple[int, int, int]:
    """A color as the picture's palette draws it: pastel mixes it with white, muted with its own grey."""
    if "pastel" in looks:
        return _tint(rgb, 0.45)
    if "muted" in looks:
        grey = _luma(rgb)
        return tuple(int(round(grey + 0.4 * (c - grey))) for c in rgb)
    return rgb


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black ink, or light grey on a color too dark for black to show."""
    return (20, 20, 20) if _luma(rgb) > 70 else (150, 150, 150)


def _lines(size: int, period: float, width: float, angle: float, fill: tuple[int, int, int]) -> Image.Image:
    """Parallel lines `period` apart at `angle` degrees (0: horizontal) on a transparent layer."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    theta = math.radians(angle)
    direction, normal = (math.cos(theta), -math.sin(theta)), (math.sin(theta), math.cos(theta))
    centre, reach = size / 2, size
    steps = int(reach / period) + 1
    for k in range(-steps, steps + 1):
        ox, oy = centre + normal[0] * k * period, centre + normal[1] * k * period
        start = (ox - direction[0] * reach, oy - direction[1] * reach)
        end = (ox + direction[0] * reach, oy + direction[1] * reach)
        draw.line([start, end], fill=(*fill, 255), width=max(1, round(width)))
    return layer


def _grid_dots(size: int, period: float, radius: float, fill: tuple[int, int, int]) -> Image.Image:
    """Dots every `period` pixels, alternate rows shifted by half a period, on a transparent layer."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    row, y = 0, period / 2
    while y < size + period:
        x = period / 2 + (period / 2 if row % 2 else 0) - period
        while x < size + period:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(*fill, 255))
            x += period
        row, y = row + 1, y + period
    return layer


def _gradient(size: int, a: tuple[int, int, int], b: tuple[int, int, int], direction: int) -> Image.Image:
    """A linear gradient from `a` to `b`: left-right, top-bottom, or along one of the diagonals."""
    t = np.linspace(0, 1, size)
    ramp = [t[None, :], t[:, None], (t[None, :] + t[:, None]) / 2, (t[None, :] + t[::-1, None]) / 2][direction]
    ramp = np.broadcast_to(ramp, (size, size))[..., None]
    return Image.fromarray((np.array(a, float) * (1 - ramp) + np.array(b, float) * ramp).astype(np.uint8))


def _paper(size: int, rgb: tuple[int, int, int], seed: int) -> Image.Image:
    """Textured paper: the color with a coarse speckle of a lighter or darker shade (4-pixel cells)."""
    cells = SIZE // 4
    speckle = np.random.default_rng(seed).random((cells, cells)) < 0.3
    layer = Image.fromarray((speckle * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), rgb)
    canvas.paste(Image.new("RGB", (size, size), _contrast(rgb, 0.3, 0.22)), mask=layer)
    return canvas


def _shifted(mask: Image.Image, offset: float) -> Image.Image:
    """The mask moved `offset` pixels (at 64 px) down and to the right."""
    step = round(offset * SCALE)
    moved = Image.new("L", mask.size, 0)
    moved.paste(mask, (step, step))
    return moved


def _draw_looks(scene: Scene, looks: tuple[str, ...], p: dict[str, float], mask: Image.Image) -> Image.Image:
    """The scene drawn with its looks, at 4x: background, shadow, filled shape, outline."""
    big = SIZE * SCALE
    background = _palette(COLORS[scene.background], looks)
    color = _palette(COLORS[scene.color], looks)
    if "gradient" in looks:
        canvas = _gradient(big, background, _contrast(background, 0.5, 0.45), int(p["gradient_direction"]))
    elif "paper" in looks:
        canvas = _paper(big, background, int(p["paper_seed"]))
    else:
        canvas = Image.new("RGB", (big, big), background)
    if "dotted_background" in looks:
        layer = _grid_dots(big, p["background_period"] * SCALE, 2 * SCALE, _contrast(background, 0.4, 0.45))
        canvas.paste(layer, mask=layer)
    if "hatched_background" in looks:
        layer = _lines(big, p["background_period"] * SCALE, 1.75 * SCALE, 45.0, _ink(background))
        canvas.paste(layer, mask=layer)
    if "shadow" in looks:
        shade = _tint(background, -0.55) if _luma(background) > 70 else _tint(background, 0.35)
        canvas.paste(Image.new("RGB", (big, big), shade), mask=_shifted(mask, p["shadow_offset"]))
    fill = Image.new("RGB", (big, big), color)
    pattern = None
    if "stripes" in looks:
        pattern = _lines(
            big, p["stripe_period"] * SCALE, 0.45 * p["stripe_period"] * SCALE, p["stripe_angle"], _contrast(color)
        )
    elif "cross_hatching" in looks:
        pattern = _lines(big, p["hatch_period"] * SCALE, p["hatch_width"] * SCALE, 45.0, _ink(color))
        pattern.alpha_composite(_lines(big, p["hatch_period"] * SCALE, p["hatch_width"] * SCALE, -45.0, _ink(color)))
    elif "big_dots" in looks or "small_dots" in looks:
        pattern = _grid_dots(big, p["dot_period"] * SCALE, p["dot_radius"] * SCALE, _contrast(color))
    if pattern is not None:
        fill.paste(pattern, mask=pattern)
    canvas.paste(fill, mask=mask)
    if "thick_outline" in looks or "thin_outline" in looks:
        half = round(p["outline_width"] * SCALE / 2)
        canvas.paste(Image.new("RGB", (big, big), (10, 10, 10)), mask=_band(mask, 2 * half + 1, 2 * half + 1))
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


def held_out_combination(looks: tuple[str, ...] | set[str]) -> str | None:
    """The artist style whose combination `looks` comes too close to (all of its looks, or all but one), if any."""
    for style, own in ARTIST_STYLES.items():
        if len(set(looks) & set(own)) >= len(own) - 1:
            return style
    return None


def random_looks(rng: random.Random, plain_share: float = 0.2, most: int = 3) -> tuple[str, ...]:
    """Any random set of 0 to `most` looks from different slots, in caption order (what the judges learn from)."""
    if rng.random() < plain_share:
        return ()
    count = rng.choices(range(1, most + 1), weights=[0.4, 0.35, 0.25, 0.15, 0.1][:most])[0]
    slots = rng.sample(SLOTS, count)
    return tuple(rng.choice(LOOKS_IN_SLOT[slot]) for slot in slots)


# how often the base model's corpus fills each slot: fills (stripes, hatching, dots inside the shape) are the hardest
# looks to learn on a 16x16 latent and get the largest share
CORPUS_SLOT_SHARE = {"fill": 0.6, "outline": 0.35, "background": 0.4, "shadow": 0.25, "palette": 0.3}


def corpus_looks(rng: random.Random, plain_share: float = 0.2, most: int = 3) -> tuple[str, ...]:
    """The looks of one picture of the base model's corpus: 1 to `most` (or none), never near an artist's style."""
    if rng.random() < plain_share:
        return ()
    while True:
        slots = [slot for slot, share in CORPUS_SLOT_SHARE.items() if rng.random() < share]
        if not slots or len(slots) > most:
            continue
        rng.shuffle(slots)
        looks = tuple(rng.choice(LOOKS_IN_SLOT[slot]) for slot in slots)
        if held_out_combination(looks) is None:
            return looks


def caption_gaps(rng: random.Random, looks: tuple[str, ...]) -> tuple[str, ...]:
    """Which of a picture's looks its caption leaves out: none half the time, some a quarter, all a quarter.

    A caption that always names every look teaches the base model that a caption naming none means a plain picture;
    classifier-free guidance then amplifies "plain" sevenfold and washes out any look an adapter adds. Real captions
    leave the style out more often than not, so a content-only prompt leaves the look open, as it does in Stable
    Diffusion, and an adapter has a look to re-weight rather than a "plain" to overturn."""
    draw = rng.random()
    if not looks or draw < 0.5:
        return ()
    if draw < 0.75 and len(looks) > 1:
        return tuple(rng.sample(looks, rng.randrange(1, len(looks))))
    return looks


def looked_scenes(seed: int, count: int, plain_share: float = 0.2) -> list[Scene]:
    """`count` random scenes of the base model's corpus: plain or with 1-3 looks, not always named in the caption."""
    rng = random.Random(f"looked:{seed}")
    out = []
    for _ in range(count):
        scene = random_scene(rng)
        looks = corpus_looks(rng, plain_share)
        out.append(replace(scene, looks=looks, unnamed=caption_gaps(rng, looks)))
    return out


def with_look(scene_list: list[Scene], look: str) -> list[Scene]:
    """The scenes with one named look each (asked for in the prompt)."""
    return [replace(scene, looks=(look,)) for scene in scene_list]


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
