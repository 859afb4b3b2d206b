"""Classifiers that judge shapes-world images, trained only on ground-truth renders (never on model outputs).

- `ContentEvaluator`: the color, shape and background color of an image (plain or any style).
- `StyleClassifier`: the probability that an image is drawn in one artist's style rather than plainly.

    python sample_data/evaluator.py      # trains the content evaluator and writes sample_data/evaluator.safetensors
"""

from __future__ import annotations

import json
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_data.shapes import (  # noqa: E402
    COLORS,
    DECORATIONS,
    SHAPES,
    STYLES,
    Scene,
    render,
    scenes,
    texture_image,
    to_array,
)

EVALUATOR_PATH = ROOT / "sample_data" / "evaluator.safetensors"
COLOR_NAMES = list(COLORS)


def _backbone(width: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]

    return nn.Sequential(
        *block(3, width),
        *block(width, 2 * width),
        *block(2 * width, 4 * width),
        *block(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class ContentEvaluator(nn.Module):
    """A small CNN with three heads: shape color (8), shape (5), background color (8)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.backbone = _backbone(width)
        self.color = nn.Linear(4 * width, len(COLORS))
        self.shape = nn.Linear(4 * width, len(SHAPES))
        self.background = nn.Linear(4 * width, len(COLORS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (color, shape, background) for images in [-1, 1]."""
        features = self.backbone(x)
        return self.color(features), self.shape(features), self.background(features)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> list[tuple[str, str, str]]:
        """(color, shape, background) names for uint8 NHWC images."""
        self.eval()
        color, shape, background = self(to_input(images))
        return [
            (COLOR_NAMES[c], SHAPES[s], COLOR_NAMES[b])
            for c, s, b in zip(
                color.argmax(1).tolist(), shape.argmax(1).tolist(), background.argmax(1).tolist(), strict=True
            )
        ]


class StyleClassifier(nn.Module):
    """A small CNN giving the probability that an image is in a given artist's style."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.backbone = _backbone(width)
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Style logits for images in [-1, 1]."""
        return self.head(self.backbone(x)).squeeze(1)

    @torch.no_grad()
    def probability(self, images: np.ndarray) -> np.ndarray:
        """Per-image style probability for uint8 NHWC images."""
        self.eval()
        return torch.sigmoid(self(to_input(images))).numpy()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _roughen(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter, so the classifiers judge content, not pixel-exact rendering."""
    if torch.rand((), generator=generator) < 0.5:
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + 0.06 * torch.rand((), generator=generator) * torch.randn(x.shape, generator=generator)
    x = x * (1 + 0.1 * (torch.rand((x.shape[0], 1, 1, 1), generator=generator) - 0.5))
    return x.clamp(-1, 1)


def render_many(scene_list: list[Scene]) -> np.ndarray:
    """Render scenes in two processes; uint8 NHWC."""
    with Pool(2) as pool:
        return np.stack(pool.map(_render, scene_list, chunksize=64))


def _render(scene: Scene) -> np.ndarray:
    return to_array(render(scene))


def train_content_evaluator(seed: int = 7, count: int = 24000, steps: int = 2500) -> ContentEvaluator:
    """Train on ground-truth renders of every style (the shapes world's own pictures)."""
    torch.manual_seed(seed)
    training = [s for style in STYLES for s in scenes(seed, count // len(STYLES), style)]
    images = render_many(training)
    labels = torch.tensor(
        [[COLOR_NAMES.index(s.color), SHAPES.index(s.shape), COLOR_NAMES.index(s.background)] for s in training]
    )
    model = ContentEvaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(training), (128,), generator=generator)
        x = _roughen(to_input(images[index.numpy()]), generator)
        color, shape, background = model(x)
        loss = (
            F.cross_entropy(color, labels[index, 0])
            + F.cross_entropy(shape, labels[index, 1])
            + F.cross_entropy(background, labels[index, 2])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0:
            print(f"evaluator step {step + 1}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def train_style_classifier(style: str, seed: int = 11, count: int = 3000, steps: int = 900) -> StyleClassifier:
    """Train `style` against everything else it could be mistaken for, on fresh ground-truth renders.

    Negatives are plain renders, the other artist styles, the base model's own decorated looks (stripes, gradients,
    outlines, speckles) and the autoencoder's broad corpus of textures (stripes, hatching, dots, outlines, noise): a
    classifier that only ever saw plain pictures calls any busy texture a style, and a fine-tune that has fallen
    apart into coloured noise, or into a look the base already had, then scores as styled."""
    torch.manual_seed(seed)
    positives = scenes(seed + 1000, count, style)
    others = [s for other in STYLES if other != style for s in scenes(seed + 2000, count // 2, other)]
    others += decorated_scenes(seed + 2500, count // 2)
    images = np.concatenate([render_many(positives + others), textures(seed + 3000, count // 2)])
    labels = torch.tensor([1.0] * count + [0.0] * (len(images) - count))
    model = StyleClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (64,), generator=generator)
        x = _roughen(to_input(images[index.numpy()]), generator)
        loss = F.binary_cross_entropy_with_logits(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def decorated_scenes(seed: int, count: int) -> list[Scene]:
    """`count` scenes in the base model's decorated looks, in equal shares."""
    return [s for look in DECORATIONS for s in scenes(seed, count // len(DECORATIONS), look)]


def textures(seed: int, count: int) -> np.ndarray:
    """`count` pictures of the autoencoder's broad procedural corpus (uint8 NHWC)."""
    with Pool(2) as pool:
        return np.stack(pool.map(_texture, [f"{seed}:{k}" for k in range(count)], chunksize=64))


def _texture(key: str) -> np.ndarray:
    return to_array(texture_image(random.Random(f"classifier-texture:{key}")))


def load_content_evaluator(path: Path = EVALUATOR_PATH) -> ContentEvaluator:
    """The shipped content evaluator."""
    from safetensors.torch import load_file

    model = ContentEvaluator()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def content_accuracy(model: ContentEvaluator, images: np.ndarray, truth: list[Scene]) -> dict[str, float]:
    """Fraction right of color, shape and background (and all three) for images of `truth`'s scenes."""
    predictions = []
    for start in range(0, len(images), 256):
        predictions += model.predict(images[start : start + 256])
    right = np.array(
        [[p[0] == s.color, p[1] == s.shape, p[2] == s.background] for p, s in zip(predictions, truth, strict=True)]
    )
    return {
        "color": float(right[:, 0].mean()),
        "shape": float(right[:, 1].mean()),
        "background": float(right[:, 2].mean()),
        "all": float(right.all(axis=1).mean()),
    }


def style_classifier_path(style: str) -> Path:
    """Where the shipped classifier of `style` lives."""
    return ROOT / "sample_data" / f"style_classifier_{style}.safetensors"


def load_style_classifier(style: str) -> StyleClassifier:
    """The shipped classifier of `style` (vs plain)."""
    from safetensors.torch import load_file

    model = StyleClassifier()
    model.load_state_dict(load_file(str(style_classifier_path(style))))
    return model.eval()


def train_and_save_style_classifiers() -> dict[str, float]:
    """Train one classifier per artist style, save them, and return their held-out accuracy."""
    from safetensors.torch import save_file

    accuracy = {}
    for style in STYLES[1:]:
        model = train_style_classifier(style)
        held_out = {
            style: render_many(scenes(5000, 200, style)),
            **{other: render_many(scenes(6000, 200, other)) for other in STYLES if other != style},
            "decorated": render_many(decorated_scenes(6500, 200)),
            "textures": textures(7000, 200),
        }
        accuracy[style] = {
            name: float(((model.probability(images) > 0.5) == (name == style)).mean())
            for name, images in held_out.items()
        }
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(style_classifier_path(style)))
    return accuracy


def main() -> None:
    """Train the content evaluator and the style classifiers, check them on held-out renders, and save them."""
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    if "--styles" in sys.argv:
        print(json.dumps({"style_classifier_accuracy": train_and_save_style_classifiers()}))
        return
    started = time.time()
    model = train_content_evaluator()
    held_out = [s for style in STYLES for s in scenes(99, 400, style)]
    accuracy = content_accuracy(model, render_many(held_out), held_out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(EVALUATOR_PATH))
    report = {"held_out_accuracy": accuracy, "seconds": round(time.time() - started, 1)}
    (ROOT / "sample_data" / "evaluator.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    random.seed(0)
    main()
