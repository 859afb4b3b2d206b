"""Classifiers that judge shapes-world images, trained only on ground-truth renders (never on model outputs).

- `ContentEvaluator`: the color, shape and background color of an image (plain, in any looks, or any style).
- `LookClassifier`: which of the named looks an image is drawn with (one yes/no head per look).
- `StyleClassifier`: the probability that an image is in one artist's style: its whole combination of looks, with
  its parameters, against everything else, including the style with one look missing or swapped.

    python sample_data/evaluator.py              # the content evaluator and the look classifier
    python sample_data/evaluator.py --styles     # the style classifiers
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sample_data.shapes import (  # noqa: E402
    ARTIST_STYLES,
    COLORS,
    LOOKS,
    LOOKS_IN_SLOT,
    SHAPES,
    STYLES,
    Scene,
    random_looks,
    random_scene,
    render,
    scenes,
    texture_image,
    to_array,
)

EVALUATOR_PATH = ROOT / "sample_data" / "evaluator.safetensors"
LOOK_CLASSIFIER_PATH = ROOT / "sample_data" / "look_classifier.safetensors"
COLOR_NAMES = list(COLORS)
LOOK_NAMES = list(LOOKS)


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


class LookClassifier(nn.Module):
    """A small CNN with one yes/no head per named look."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.backbone = _backbone(width)
        self.head = nn.Linear(4 * width, len(LOOKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-look logits for images in [-1, 1]."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Per-image, per-look probabilities (N x looks, in LOOKS order) for uint8 NHWC images."""
        self.eval()
        return np.concatenate(
            [torch.sigmoid(self(to_input(images[k : k + 256]))).numpy() for k in range(0, len(images), 256)]
        )


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


def judged_scenes(seed: int, count: int) -> list[Scene]:
    """What the judges learn from: a sixth plain scenes, half any combination of looks, a third artist styles."""
    rng = random.Random(f"judged:{seed}")
    out = []
    for index in range(count):
        kind = index % 6
        if kind == 0:
            out.append(random_scene(rng))
        elif kind <= 3:
            out.append(replace(random_scene(rng), looks=random_looks(rng, 0.0, most=4)))
        else:
            out.append(random_scene(rng, rng.choice(list(ARTIST_STYLES))))
    return out


def _fit(model: nn.Module, images: np.ndarray, labels: torch.Tensor, loss, steps: int, batch: int, seed: int):
    """Train `model` on roughened `images` with AdamW and a one-cycle schedule; returns it in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        value = loss(model(_roughen(to_input(images[index.numpy()]), generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0:
            print(f"{type(model).__name__} step {step + 1}: loss {value.item():.4f}", flush=True)
    return model.eval()


def _content_loss(logits, labels: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(head, labels[:, k]) for k, head in enumerate(logits))


def content_indices(scene: Scene) -> list[int]:
    """A scene's (color, shape, background) as class indices."""
    return [COLOR_NAMES.index(scene.color), SHAPES.index(scene.shape), COLOR_NAMES.index(scene.background)]


def content_labels(scene_list: list[Scene]) -> torch.Tensor:
    """(color, shape, background) class indices of each scene."""
    return torch.tensor([content_indices(s) for s in scene_list])


def look_labels(scene_list: list[Scene]) -> torch.Tensor:
    """Which looks each scene is drawn with (N x looks, 0/1)."""
    return torch.tensor([[float(name in s.drawn_looks) for name in LOOK_NAMES] for s in scene_list])


def train_content_evaluator(training: list[Scene], images: np.ndarray, steps: int = 3000) -> ContentEvaluator:
    """Train on ground-truth renders (`judged_scenes`): plain, in any combination of looks, in every artist style."""
    torch.manual_seed(7)
    return _fit(ContentEvaluator(), images, content_labels(training), _content_loss, steps, 128, seed=7)


def train_look_classifier(training: list[Scene], images: np.ndarray, steps: int = 6000) -> LookClassifier:
    """Train one yes/no head per look on the same ground-truth renders."""
    torch.manual_seed(9)
    loss = F.binary_cross_entropy_with_logits
    return _fit(LookClassifier(), images, look_labels(training), loss, steps, 128, seed=9)


def near_misses(style: str, seed: int, count: int) -> list[Scene]:
    """The style with one of its looks left out or swapped for another look of the same slot (drawn as looks)."""
    rng = random.Random(f"near-miss:{style}:{seed}")
    own = ARTIST_STYLES[style]
    out = []
    for _ in range(count):
        looks = list(own)
        k = rng.randrange(len(looks))
        others = [name for name in LOOKS_IN_SLOT[LOOKS[looks[k]].slot] if name != looks[k]]
        if others and rng.random() < 0.5:
            looks[k] = rng.choice(others)
        else:
            del looks[k]
        out.append(replace(random_scene(rng), looks=tuple(looks)))
    return out


def train_style_classifier(style: str, seed: int = 11, count: int = 3000, steps: int = 1500) -> StyleClassifier:
    """Train `style` against everything else it could be mistaken for, on fresh ground-truth renders.

    Negatives: the style with one look missing or swapped (drawn with the base model's own parameters), any other
    combination of looks, plain renders, the other artist styles, and the autoencoder's broad corpus of textures
    (a fine-tune fallen apart into coloured noise must not score as styled). So a picture scores only if it has the
    whole combination."""
    torch.manual_seed(seed)
    positives = scenes(seed + 1000, count, style)
    negatives = near_misses(style, seed + 1500, count)
    negatives += [s for s in judged_scenes(seed + 2000, count) if s.style != style]
    images = np.concatenate([render_many(positives + negatives), textures(seed + 3000, count // 4)])
    labels = torch.tensor([1.0] * count + [0.0] * (len(images) - count))
    loss = F.binary_cross_entropy_with_logits
    return _fit(StyleClassifier(), images, labels, loss, steps, 64, seed)


def textures(seed: int, count: int) -> np.ndarray:
    """`count` pictures of the autoencoder's broad procedural corpus (uint8 NHWC)."""
    with Pool(2) as pool:
        return np.stack(pool.map(_texture, [f"{seed}:{k}" for k in range(count)], chunksize=64))


def _texture(key: str) -> np.ndarray:
    return to_array(texture_image(random.Random(f"classifier-texture:{key}")))


def load_content_evaluator(path: Path = EVALUATOR_PATH) -> ContentEvaluator:
    """The shipped content evaluator."""
    return _load(ContentEvaluator(), path)


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


def _load(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_style_classifier(style: str) -> StyleClassifier:
    """The shipped classifier of `style` (its whole combination of looks against everything else)."""
    return _load(StyleClassifier(), style_classifier_path(style))


def load_look_classifier(path: Path = LOOK_CLASSIFIER_PATH) -> LookClassifier:
    """The shipped look classifier."""
    return _load(LookClassifier(), path)


def look_accuracy(model: LookClassifier, images: np.ndarray, truth: list[Scene]) -> dict[str, dict[str, float]]:
    """Per look: how often it is found where it is drawn (recall) and not found where it is not (specificity)."""
    found = model.probabilities(images) > 0.5
    drawn = look_labels(truth).numpy() > 0.5
    return {
        name: {
            "recall": round(float(found[drawn[:, k], k].mean()), 4) if drawn[:, k].any() else None,
            "specificity": round(float((~found[~drawn[:, k], k]).mean()), 4) if (~drawn[:, k]).any() else None,
        }
        for k, name in enumerate(LOOK_NAMES)
    }


def style_held_out_sets(style: str) -> dict[str, np.ndarray]:
    """Fresh renders a style classifier is checked on: the style, its near misses, other looks and styles, textures."""
    return {
        style: render_many(scenes(5000, 200, style)),
        "near_misses": render_many(near_misses(style, 5500, 200)),
        **{other: render_many(scenes(6000, 200, other)) for other in STYLES if other != style},
        "looks": render_many([s for s in judged_scenes(6500, 400) if s.style != style]),
        "textures": textures(7000, 200),
    }


def train_and_save_style_classifiers() -> dict[str, dict[str, float]]:
    """Train one classifier per artist style, save them, and return their held-out accuracy per kind of picture."""
    accuracy = {}
    for style in ARTIST_STYLES:
        model = train_style_classifier(style)
        accuracy[style] = {
            name: round(float(((model.probability(images) > 0.5) == (name == style)).mean()), 4)
            for name, images in style_held_out_sets(style).items()
        }
        _save(model, style_classifier_path(style))
    return accuracy


def main() -> None:
    """Train the judges, check them on held-out renders, and save them."""
    torch.set_num_threads(2)
    if "--styles" in sys.argv:
        print(json.dumps({"style_classifier_accuracy": train_and_save_style_classifiers()}))
        return
    started = time.time()
    training = judged_scenes(7, 36000)
    training_images = render_many(training)
    content = train_content_evaluator(training, training_images)
    _save(content, EVALUATOR_PATH)
    looks = train_look_classifier(training, training_images)
    _save(looks, LOOK_CLASSIFIER_PATH)
    held_out = judged_scenes(99, 1200)
    images = render_many(held_out)
    report = {
        "held_out_content_accuracy": content_accuracy(content, images, held_out),
        "held_out_look_accuracy": look_accuracy(looks, images, held_out),
        "seconds": round(time.time() - started, 1),
    }
    (ROOT / "sample_data" / "evaluator.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    random.seed(0)
    main()
