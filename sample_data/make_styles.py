"""Write the demo style datasets: sample_data/styles/<style>/NNN.png with `.txt` captions, 60 images each.

    python sample_data/make_styles.py

Each style is a combination of the demo world's named looks with fixed parameters (`ARTIST_STYLES` in shapes.py):
"ink" (thick outline, cross-hatching, hatched background, pastel colors), "halftone" (big dots, dotted background,
thin outline) and "poster" (stripes, shadow, gradient, muted colors). The demo UNet draws every one of those looks on
request, but its corpus never holds a style's combination, nor all but one of its looks. Captions name only the
content ("a red star on a blue background"): the look is what a style adapter's trigger word learns. The (color,
shape) pairs in HELD_OUT_PAIRS are left out, so benchmarks can test on pairs the adapter never saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_data.shapes import HELD_OUT_PAIRS, render, scenes  # noqa: E402

STYLE_SETS = {"ink": 501, "halftone": 502, "poster": 503}
COUNT = 60


def write_style_set(style: str, seed: int, folder: Path, count: int = COUNT) -> None:
    """Render `count` scenes of `style` with their captions into `folder` (replacing what was there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    for index, scene in enumerate(scenes(seed, count, style, exclude=HELD_OUT_PAIRS)):
        render(scene).save(folder / f"{index:03d}.png", optimize=True)
        (folder / f"{index:03d}.txt").write_text(scene.prompt + "\n")


def main() -> None:
    """Write every style set."""
    for style, seed in STYLE_SETS.items():
        write_style_set(style, seed, ROOT / "sample_data" / "styles" / style)
        print(f"wrote sample_data/styles/{style}")


if __name__ == "__main__":
    main()
