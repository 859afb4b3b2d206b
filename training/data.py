"""Training data: folder scan with a validation report, captions, aspect-ratio buckets, image transforms."""

from __future__ import annotations

import hashlib
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECAR_SUFFIXES = (".txt", ".caption", ".json", ".toml", ".npz")
MIN_IMAGE_SIDE = 64
MAX_IMAGE_PIXELS = 64_000_000  # larger headers are treated as decompression bombs, never decoded
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
NEAR_DUPLICATE_BITS = 6  # difference-hash bits (of 64) two images may differ by and still count as near-duplicates
NEAR_DUPLICATE_COLOR = 12.0  # and the mean colour difference (0-255) of their 8x8 thumbnails


@dataclass(frozen=True)
class DatasetItem:
    """One usable training image and the caption it will be trained with."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class SkippedFile:
    """A file in the data folder that will not be trained on, and why."""

    path: Path
    reason: str


@dataclass
class DatasetReport:
    """The validation report of a data folder: what is kept, what is skipped (with reasons), and notes on kept files."""

    root: Path
    items: list[DatasetItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[SkippedFile] = field(default_factory=list)  # kept files worth a look (near-duplicates)

    def summary(self) -> str:
        """A human-readable report, one line per skipped file and per note."""
        lines = [f"{len(self.items)} image(s) kept, {len(self.skipped)} file(s) skipped in {self.root}"]
        lines += [f"  skipped {s.path.name}: {s.reason}" for s in self.skipped]
        lines += [f"  note {n.path.name}: {n.reason}" for n in self.notes]
        return "\n".join(lines)

    def notes_for(self, path: Path) -> list[str]:
        """The notes about one kept file."""
        return [n.reason for n in self.notes if n.path == path]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya-style {folder: {tag: count}} over the comma-separated caption tags."""
        counts: dict[str, int] = {}
        for item in self.items:
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return {self.root.name: counts}


class _TooLarge(ValueError):
    """An image over the pixel limit (its header was read, its pixels were not)."""


def open_image(path: Path) -> Image.Image:
    """Open an image fully decoded and upright; raise ValueError with a readable reason if it is unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise _TooLarge(
                        f"image is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                        "(possible decompression bomb; not decoded)"
                    )
                image.seek(0)  # first frame of animations
                image.load()
                upright = ImageOps.exif_transpose(image)
                return _to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(
            f"image header claims an unsafe size (possible decompression bomb; not decoded): {exc}"
        ) from None
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (corrupt or unsupported format)") from None
    except _TooLarge:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error... on damaged files
        raise ValueError(f"unreadable image: {exc or type(exc).__name__}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "F":  # float images: 0..1 (or 0..255 when larger values are present)
        peak = image.getextrema()[1]
        image = image.point(lambda v: v * 255 if peak <= 1.0 else v).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def caption_for(image_path: Path, trigger: str, default_caption: str) -> str:
    """The image's `.txt` sidecar caption (or the default), with the trigger word prepended when missing."""
    sidecar = image_path.with_suffix(".txt")
    caption = ""
    if sidecar.is_file():
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
    caption = " ".join(caption.split()) or default_caption
    if trigger and trigger.lower() not in caption.lower().replace(",", " ").split():
        caption = f"{trigger}, {caption}"
    return caption


def without_trigger(caption: str, trigger: str) -> str:
    """The caption with every occurrence of the trigger word (and the comma after it) taken out."""
    if not trigger:
        return caption
    words = re.split(r"(\s+)", caption)
    kept = [w for w in words if w.strip().rstrip(",").lower() != trigger.lower()]
    return " ".join("".join(kept).split()).strip(" ,")


def difference_hash(image: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 greyscale thumbnail brighter than its right neighbour."""
    small = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = list(small.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def _color_thumbnail(image: Image.Image) -> bytes:
    return image.convert("RGB").resize((8, 8), Image.Resampling.BOX).tobytes()


def near_duplicate(a: tuple[int, bytes], b: tuple[int, bytes]) -> int | None:
    """Hash distance of two (difference hash, colour thumbnail) fingerprints if they look alike, else None."""
    distance = bin(a[0] ^ b[0]).count("1")
    if distance > NEAR_DUPLICATE_BITS:
        return None
    color = sum(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) / len(a[1])
    return distance if color <= NEAR_DUPLICATE_COLOR else None


def scan_dataset(data_dir: str | Path, trigger: str, default_caption: str) -> DatasetReport:
    """Validate every file in `data_dir`: usable images become items, the rest are listed with a reason.

    Exact duplicates (same bytes) are skipped; near-duplicates (resized, re-encoded) are kept with a note."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    report = DatasetReport(root=root)
    digests: dict[str, Path] = {}
    fingerprints: list[tuple[Path, tuple[int, bytes]]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in SIDECAR_SUFFIXES:
            continue
        if suffix not in IMAGE_SUFFIXES:
            accepted = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
            reason = f"unsupported file type {suffix or '(none)'} (accepted: {accepted})"
            report.skipped.append(SkippedFile(path, reason))
            continue
        if path.stat().st_size == 0:
            report.skipped.append(SkippedFile(path, "empty file (0 bytes)"))
            continue
        try:
            image = open_image(path)
        except ValueError as exc:
            report.skipped.append(SkippedFile(path, str(exc)))
            continue
        if min(image.size) < MIN_IMAGE_SIDE:
            report.skipped.append(
                SkippedFile(path, f"too small ({image.width}x{image.height}; at least {MIN_IMAGE_SIDE} px a side)")
            )
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in digests:
            report.skipped.append(SkippedFile(path, f"exact duplicate of {digests[digest].name}"))
            continue
        digests[digest] = path
        fingerprint = (difference_hash(image), _color_thumbnail(image))
        for other, other_print in fingerprints:
            distance = near_duplicate(fingerprint, other_print)
            if distance is not None:
                report.notes.append(
                    SkippedFile(path, f"near-duplicate of {other.name} (difference hash {distance}/64 bits apart)")
                )
                break
        fingerprints.append((path, fingerprint))
        report.items.append(DatasetItem(path, caption_for(path, trigger, default_caption), *image.size))
    return report


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height): multiples of `step` with area at most resolution squared."""
    max_area = resolution * resolution
    buckets = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties go to the larger area)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def crop_box(size: tuple[int, int], bucket: tuple[int, int], center: bool, rng: random.Random) -> tuple:
    """Scale factor and crop (left, top) that make an image of `size` cover `bucket` exactly."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    scaled = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    spare_x, spare_y = scaled[0] - bucket[0], scaled[1] - bucket[1]
    if center:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    return scaled, (left, top)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size and crop conditioning of one training image (Podell et al. 2023, arXiv:2307.01952, 2.2)."""

    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in the resized image, as the image is finally seen
    target_size: tuple[int, int]  # (height, width) trained at: the bucket

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """The six numbers SDXL's UNet takes as `time_ids`: original size, crop top-left, target size."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def size_conditioning(
    size: tuple[int, int], bucket: tuple[int, int], center: bool, flip: bool, rng: random.Random
) -> SizeConditioning:
    """What `image_to_tensor` does to an image of `size` (width, height), given an RNG in the same state as its own."""
    scaled, (left, top) = crop_box(size, bucket, center, rng)
    if flip:  # the crop's left edge as seen in the mirrored image
        left = scaled[0] - bucket[0] - left
    return SizeConditioning((size[1], size[0]), (top, left), (bucket[1], bucket[0]))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as `open_image` returns it (EXIF rotation applied), from its header."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


def image_to_tensor(image: Image.Image, bucket: tuple[int, int], center: bool, flip: bool, rng: random.Random):
    """Resize-and-crop `image` to `bucket`, optionally mirrored; a CHW float tensor in [-1, 1]."""
    scaled, (left, top) = crop_box(image.size, bucket, center, rng)
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    cropped = resized.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
    tensor = data.view(bucket[1], bucket[0], 3).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


@dataclass(frozen=True)
class Sample:
    """One entry of an epoch: an image, its caption, bucket and loss weight (class images weigh less)."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    weight: float = 1.0
    is_class: bool = False
    size: tuple[int, int] | None = None  # (width, height) of the source image; None: the bucket's


def batch_schedule(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: same-bucket sample indices, shuffled reproducibly from (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, sample in enumerate(samples):
        by_bucket.setdefault(sample.bucket, []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def drops_caption(seed: int, epoch: int, index: int, rate: float) -> bool:
    """Whether caption dropout trains this sample on the empty prompt this epoch (its own RNG, so resumes repeat it)."""
    return rate > 0 and random.Random(f"{seed}:{epoch}:{index}:caption").random() < rate


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A per-sample RNG for augmentations, derived from (seed, epoch, index) so resumes repeat them exactly."""
    return random.Random(f"{seed}:{epoch}:{index}")
