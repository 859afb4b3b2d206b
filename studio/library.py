"""The on-disk workspace: where datasets, adapters, training runs and outputs live."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import stat
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from studio import atomic, sidecars
from studio.models import DEMO_MODEL_DIR
from studio.sidecars import PREVIEW_SUFFIX

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
MAX_IMPORT_BYTES = 2 * 1024**3  # cap on the uncompressed size of one upload (zip bombs)
MAX_FILE_BYTES = 256 * 1024**2  # cap on one image (a 64-megapixel 16-bit TIFF still fits)
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_RATIO = 200  # uncompressed / compressed size of one zip entry; images barely compress, bombs do
ZIP_RATIO_FLOOR = 1024**2  # entries smaller than this may compress as well as they like
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
DATASET_SETTINGS = "dataset.json"
# style sets made for the bundled demo model (sample_data/make_styles.py): ready examples for a first run
EXAMPLE_STYLES_DIR = DEMO_MODEL_DIR.parent / "styles"


def example_styles() -> list[str]:
    """Names of the bundled example style sets (empty where the repository's sample_data is not present)."""
    if not EXAMPLE_STYLES_DIR.is_dir():
        return []
    return sorted(p.name for p in EXAMPLE_STYLES_DIR.iterdir() if p.is_dir() and any(p.glob("*.png")))


def safe_name(name: str) -> str:
    """`name` if it is a plain file-name stem (letters, digits, _ . -); raise a ValueError otherwise."""
    name = (name or "").strip()
    if not SAFE_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-' (CivitAI's LoRA name rule)"
        )
    return name


def sanitize_filename(name: str, default: str = "file") -> str:
    """A safe file name made from an uploaded one: no folders, only letters, digits, _ . - (suffix kept).

    Accents are dropped ("café" -> "cafe"); when letters with no ASCII form are lost ("猫"), a short hash of the
    original stem is appended, so different names stay different and an image and its caption still pair up."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    decomposed = unicodedata.normalize("NFKD", stem)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    lossy = any(ord(c) > 127 for c in plain)
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", plain.encode("ascii", "ignore").decode()).strip("_.-")[:56]
    if lossy:
        tag = hashlib.sha256(stem.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[:47]}_{tag}" if cleaned else f"{default}_{tag}"
    suffix = re.sub(r"[^A-Za-z0-9]+", "", suffix)[:8].lower()
    cleaned = cleaned or default
    return safe_name(f"{cleaned}.{suffix}" if suffix else cleaned)


@dataclass
class ImportReport:
    """What an upload added to a dataset, and what it refused and why."""

    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: ImportReport) -> None:
        """Add another report's lines to this one."""
        self.added += other.added
        self.skipped += other.skipped

    def summary(self) -> str:
        """One line: how many files were added and skipped."""
        return f"{len(self.added)} file(s) added, {len(self.skipped)} refused"


@dataclass(frozen=True)
class Workspace:
    """A folder holding everything the studio makes: datasets/, adapters/, runs/, exports/ and outputs/."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        for folder in (self.datasets_dir, self.adapters_dir, self.runs_dir, self.exports_dir, self.outputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ folders
    @property
    def datasets_dir(self) -> Path:
        """Training image sets, one folder each (images plus .txt caption sidecars)."""
        return self.root / "datasets"

    @property
    def adapters_dir(self) -> Path:
        """Trained and imported adapters, one .safetensors each, with A1111's NAME.json and NAME.preview.png."""
        return self.root / "adapters"

    @property
    def runs_dir(self) -> Path:
        """Training runs: checkpoints, samples and class images."""
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        """CivitAI-ready copies made for download."""
        return self.root / "exports"

    @property
    def outputs_dir(self) -> Path:
        """Generated images."""
        return self.root / "outputs"

    def adapter_path(self, name: str) -> Path:
        """The file of the adapter called `name` (which need not exist yet)."""
        return self.adapters_dir / f"{safe_name(name)}.safetensors"

    def run_dir(self, name: str) -> Path:
        """The run folder of the adapter called `name`."""
        return self.runs_dir / safe_name(name)

    def list_adapters(self) -> list[str]:
        """Names of the adapters in the workspace, sorted."""
        return sorted(p.stem for p in self.adapters_dir.glob("*.safetensors"))

    def existing_adapter(self, name: str) -> Path:
        """The file of an adapter that must exist; a readable error otherwise."""
        if not (name or "").strip():
            raise ValueError("choose an adapter")
        path = self.adapter_path(name)
        if not path.is_file():
            raise ValueError(f"no adapter named {name!r} in the library")
        return path

    # ------------------------------------------------------------------ datasets
    def dataset_dir(self, name: str) -> Path:
        """The folder of the dataset called `name` (which need not exist yet)."""
        return self.datasets_dir / safe_name(name)

    def list_datasets(self) -> list[str]:
        """Names of the datasets in the workspace, sorted."""
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def existing_dataset(self, name: str) -> Path:
        """The folder of a dataset that must exist; a readable error otherwise."""
        if not (name or "").strip():
            raise ValueError("choose or name a dataset first")
        folder = self.dataset_dir(name)
        if not folder.is_dir():
            raise ValueError(f"no dataset named {name!r} in the workspace")
        return folder

    def dataset_settings(self, name: str) -> dict:
        """The dataset's saved settings (trigger word, class noun); defaults if none were saved."""
        path = self.dataset_dir(name) / DATASET_SETTINGS
        settings = {"trigger": "sks", "class_noun": "style"}
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                settings.update(json.loads(path.read_text(encoding="utf-8")))
        return settings

    def save_dataset_settings(self, name: str, **values: str) -> dict:
        """Merge `values` into the dataset's settings file and return the result."""
        folder = self.dataset_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        settings = {**self.dataset_settings(name), **values}
        atomic.write_text(folder / DATASET_SETTINGS, json.dumps(settings, indent=1))
        return settings

    def dataset_images(self, name: str) -> list[Path]:
        """The image files of a dataset, sorted by name."""
        folder = self.existing_dataset(name)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def import_files(self, name: str, files: list[str | Path]) -> ImportReport:
        """Copy uploaded images and the images inside uploaded zips into dataset `name` (created if needed).

        Nothing is written outside the dataset folder: names are sanitised, zip entries with absolute paths,
        '..' or links are refused, and sizes are capped (per file, per upload, and by zip compression ratio)."""
        folder = self.dataset_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        batch = _ImportBatch(folder)
        loose = []
        for file in files:
            path = Path(file)
            suffix = path.suffix.lower()
            if suffix == ".zip":
                _import_zip(path, batch)
            elif suffix in IMAGE_SUFFIXES + (CAPTION_SUFFIX,):
                loose.append(path)
            elif suffix in ARCHIVE_SUFFIXES:
                batch.report.skipped.append((path.name, f"{suffix} archives are not unpacked; upload a .zip"))
            else:
                batch.report.skipped.append((path.name, f"not an image or a .zip ({path.suffix or 'no suffix'})"))
        for path in _images_first(loose, key=lambda p: p.name):
            with open(path, "rb") as handle:
                batch.add(path.name, path.name, handle)
        return batch.report

    def import_folder(self, name: str, source: str | Path) -> ImportReport:
        """Copy the images (and .txt captions) of a folder on the server into dataset `name`."""
        if not str(source or "").strip():
            raise ValueError("enter the path of a folder of images on the server")
        source = Path(str(source).strip()).expanduser()
        if not source.is_dir():
            raise ValueError(f"folder not found: {source}")
        files = [p for p in sorted(source.iterdir()) if p.is_file() and not p.is_symlink()]
        return self.import_files(name, files)

    def add_example(self, style: str, trigger: str = "sks") -> tuple[str, ImportReport | None]:
        """Make bundled example style set `style` a workspace dataset of that name, with `trigger` as its trigger word.

        Returns (dataset name, import report); the report is None when the dataset was already there (left as is)."""
        if style not in example_styles():
            raise ValueError(f"no example style set {style!r}; choose one of {', '.join(example_styles()) or 'none'}")
        name = safe_name(style)
        if self.dataset_dir(name).is_dir() and self.dataset_images(name):
            return name, None
        report = self.import_folder(name, EXAMPLE_STYLES_DIR / style)
        self.save_dataset_settings(name, trigger=trigger, class_noun="style")
        return name, report

    def captions(self, name: str) -> list[tuple[str, str]]:
        """(image file name, caption text) for every image of the dataset ("" when it has no sidecar)."""
        rows = []
        for image in self.dataset_images(name):
            sidecar = image.with_suffix(CAPTION_SUFFIX)
            text = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
            rows.append((image.name, text))
        return rows

    def save_captions(self, name: str, rows: list[tuple[str, str]]) -> int:
        """Write each (image file name, caption) as the image's .txt sidecar; return how many were written."""
        folder = self.existing_dataset(name)
        images = {p.name for p in self.dataset_images(name)}
        written = 0
        for file_name, caption in rows:
            if file_name not in images:
                raise ValueError(f"{file_name!r} is not an image of dataset {name!r}")
            sidecar = (folder / file_name).with_suffix(CAPTION_SUFFIX)
            text = " ".join(str(caption or "").split())
            if text:
                atomic.write_text(sidecar, text + "\n")
            else:
                sidecar.unlink(missing_ok=True)
            written += 1
        return written

    # ------------------------------------------------------------------ adapters
    def preview_path(self, name: str) -> Path:
        """The preview image of adapter `name` (which need not exist)."""
        return self.adapters_dir / f"{safe_name(name)}{PREVIEW_SUFFIX}"

    def set_preview(self, name: str, image: str | Path) -> Path:
        """Make `image` (a PNG) the preview of adapter `name`."""
        self.existing_adapter(name)
        image = Path(image)
        if not image.is_file():
            raise ValueError(f"image not found: {image}")
        target = self.preview_path(name)
        with atomic.atomic_path(target) as tmp:
            shutil.copyfile(image, tmp)
        return target

    def samples_dir(self, name: str) -> Path:
        """The final sample images a training run wrote beside adapter `name`."""
        return self.adapters_dir / f"{safe_name(name)}_samples"

    def rename_adapter(self, old: str, new: str) -> Path:
        """Rename adapter `old` to `new` (its title inside the file too), with its sidecars and samples."""
        source = self.existing_adapter(old)
        target = self.adapter_path(new)
        if target.exists():
            raise ValueError(f"an adapter named {new!r} already exists")
        try:
            sidecars.export_with_sidecars(source, target, embed=False, title=safe_name(new))
        except BaseException:
            target.unlink(missing_ok=True)
            sidecars.remove_sidecars(target)
            raise
        if self.samples_dir(old).exists():
            self.samples_dir(old).rename(self.samples_dir(new))
        source.unlink()
        sidecars.remove_sidecars(source)
        return target

    def import_adapter(
        self, source: str | Path, name: str = "", extras: Iterable[str | Path] = ()
    ) -> tuple[Path, list[str]]:
        """Copy a checked adapter file into the library as `name` (default: its file name) with the A1111 sidecars
        among `extras` or beside it; (library file, warnings about unusable sidecars). Nothing is left on failure."""
        source = Path(source)
        target_name = safe_name(name) if (name or "").strip() else Path(sanitize_filename(source.name)).stem
        target = self.adapter_path(target_name)
        if target.exists():
            raise ValueError(f"an adapter named {target_name!r} already exists; give another name")
        found = sidecars.gather(source, extras)
        try:
            with atomic.atomic_path(target, exclusive=True) as tmp:  # a simultaneous import of the same name loses
                shutil.copyfile(source, tmp)
        except FileExistsError:
            raise ValueError(f"an adapter named {target_name!r} already exists; give another name") from None
        try:
            sidecars.write_sidecars(target, found.fields, found.preview)
        except BaseException:
            target.unlink(missing_ok=True)
            sidecars.remove_sidecars(target)
            raise
        return target, found.warnings

    def delete_adapter(self, name: str) -> None:
        """Delete adapter `name`, its sidecars and its final samples (training runs are kept)."""
        path = self.existing_adapter(name)
        path.unlink()
        sidecars.remove_sidecars(path)
        shutil.rmtree(self.samples_dir(name), ignore_errors=True)

    def checkpoints(self, name: str) -> list[tuple[str, Path]]:
        """(label, adapter file) of the saved checkpoints of run `name`, oldest first, then the final adapter."""
        found = []
        for folder in sorted((self.run_dir(name) / "checkpoints").glob("step-*")):
            adapter = folder / "adapter.safetensors"
            if adapter.is_file():
                found.append((folder.name, adapter))
        final = self.adapter_path(name)
        if final.is_file():
            found.append(("final", final))
        return found


def _content_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            hashes[_file_sha256(path)] = path.name
    return hashes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique(folder: Path, file_name: str) -> Path:
    target = folder / file_name
    stem, suffix = target.stem, target.suffix
    counter = 1
    while target.exists():
        target = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return target


def _images_first(entries: list, key) -> list:
    """Images before captions (otherwise in the given order), so each caption can follow its image's final name."""
    return sorted(entries, key=lambda e: key(e).lower().endswith(CAPTION_SUFFIX))


class _Refused(Exception):
    """Raised inside an atomic write to abandon the file; the message is the reason shown to the user."""


class _ImportBatch:
    """One upload into one dataset folder: byte budget, content hashes, and where each image's caption goes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.report = ImportReport()
        self.seen = _content_hashes(folder)
        self.budget = MAX_IMPORT_BYTES
        self.caption_stems: dict[str, str | None] = {}  # image path without suffix -> stem of its caption (None: drop)
        self.new: set[str] = set()

    def add(self, original: str, display: str, handle) -> None:
        """Copy one file (an image or a .txt caption) from `handle` into the folder under a sanitised name."""
        key = str(PurePosixPath(original.replace("\\", "/")).with_suffix(""))
        try:
            file_name = sanitize_filename(original)
        except ValueError:
            self.report.skipped.append((display, "file name cannot be made safe"))
            return
        is_caption = file_name.lower().endswith(CAPTION_SUFFIX)
        if is_caption:
            stem = self.caption_stems.get(key, PurePosixPath(file_name).stem)
            if stem is None:
                self.report.skipped.append((display, "caption of an image that was not added"))
                return
            target = self.folder / f"{stem}{CAPTION_SUFFIX}"  # a caption replaces the old one for the same image
        else:
            target = _unique(self.folder, file_name)
        limit = min(MAX_FILE_BYTES, self.budget)
        digest, size, duplicate = hashlib.sha256(), 0, None
        try:
            with atomic.atomic_path(target, exclusive=not is_caption) as tmp, open(tmp, "wb") as out:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(f"larger than the {_mib(MAX_FILE_BYTES)} limit for one file")
                    digest.update(chunk)
                    out.write(chunk)
                if size == 0:
                    raise _Refused("empty file (0 bytes)")
                duplicate = None if is_caption else self.seen.get(digest.hexdigest())
                if duplicate is not None:
                    raise _Refused(f"duplicate of {duplicate}")
        except FileExistsError:  # another upload took this name while we were copying: never overwrite it
            self.budget -= size
            self.report.skipped.append((display, f"{target.name} was added by another upload meanwhile; try again"))
            self.caption_stems[key] = None
            return
        except _Refused as refused:
            self.budget -= size
            if size > limit and limit < MAX_FILE_BYTES:
                raise ValueError(
                    f"upload is larger than the {_mib(MAX_IMPORT_BYTES)} limit "
                    f"(stopped at {display}; the files before it were added)"
                ) from None
            self.report.skipped.append((display, str(refused)))
            if not is_caption:  # a re-uploaded image's caption updates the copy already in the dataset
                keep = duplicate is not None and duplicate not in self.new
                self.caption_stems[key] = PurePosixPath(duplicate).stem if keep else None
            return
        self.budget -= size
        if not is_caption:
            self.seen[digest.hexdigest()] = target.name
            self.caption_stems[key] = target.stem
            self.new.add(target.name)
        self.report.added.append(target.name)


def _mib(size: int) -> str:
    return f"{size / 1024**2:g} MiB"


def _unsafe_zip_entry(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted, or None."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symbolic link"
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path leaves the folder ('..')"
    return None


def _import_zip(path: Path, batch: _ImportBatch) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path.name} is not a valid zip file ({exc})") from None
    report = batch.report
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        if len(entries) > MAX_ZIP_ENTRIES:
            raise ValueError(f"{path.name} holds {len(entries)} files; the limit is {MAX_ZIP_ENTRIES}")
        if sum(i.file_size for i in entries) > batch.budget:
            raise ValueError(f"{path.name} unpacks to more than the {_mib(MAX_IMPORT_BYTES)} limit")
        wanted = []
        for info in entries:
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if base.startswith(".") or "__MACOSX" in info.filename:
                continue
            problem = _unsafe_zip_entry(info)
            if problem:
                report.skipped.append((info.filename, f"refused: {problem}"))
                continue
            suffix = PurePosixPath(base).suffix.lower()
            if suffix in ARCHIVE_SUFFIXES:
                report.skipped.append((info.filename, "an archive inside the archive is not unpacked"))
                continue
            if suffix not in IMAGE_SUFFIXES + (CAPTION_SUFFIX,):
                report.skipped.append((info.filename, f"not an image ({suffix or 'no suffix'})"))
                continue
            if info.file_size > ZIP_RATIO_FLOOR and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
                ratio = info.file_size // max(1, info.compress_size)
                report.skipped.append(
                    (info.filename, f"refused: compressed {ratio}:1, over the {MAX_ZIP_RATIO}:1 limit (zip bomb)")
                )
                continue
            wanted.append(info)
        for info in _images_first(wanted, key=lambda i: i.filename):
            try:
                with archive.open(info) as handle:
                    batch.add(info.filename, info.filename, handle)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error) as exc:
                report.skipped.append((info.filename, f"cannot be read from the zip ({exc})"))
