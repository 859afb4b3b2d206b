"""The on-disk workspace: where datasets, adapters, training runs and outputs live."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from studio import atomic

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
MAX_IMPORT_BYTES = 2 * 1024**3  # cap on the uncompressed size of one upload (zip bombs)
MAX_ZIP_ENTRIES = 20_000
DATASET_SETTINGS = "dataset.json"
PREVIEW_SUFFIX = ".preview.png"


def safe_name(name: str) -> str:
    """`name` if it is a plain file-name stem (letters, digits, _ . -); raise a ValueError otherwise."""
    name = (name or "").strip()
    if not SAFE_NAME.fullmatch(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-' (CivitAI's LoRA name rule)"
        )
    return name


def sanitize_filename(name: str, default: str = "file") -> str:
    """A safe file name made from an uploaded one: no folders, only letters, digits, _ . - (suffix kept)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_.-")[:56] or default
    suffix = re.sub(r"[^A-Za-z0-9]+", "", suffix)[:8].lower()
    return safe_name(f"{stem}.{suffix}" if suffix else stem)


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
        """Trained and imported adapters, one .safetensors each."""
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
        """Copy uploaded images and the images inside uploaded zips into dataset `name` (created if needed)."""
        folder = self.dataset_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        report = ImportReport()
        seen = _content_hashes(folder)
        for file in files:
            path = Path(file)
            if path.suffix.lower() == ".zip":
                report.merge(_import_zip(path, folder, seen))
            elif path.suffix.lower() in IMAGE_SUFFIXES + (CAPTION_SUFFIX,):
                with open(path, "rb") as handle:
                    _add_file(path.name, handle, folder, seen, report, MAX_IMPORT_BYTES)
            else:
                report.skipped.append((path.name, f"not an image or a .zip ({path.suffix or 'no suffix'})"))
        return report

    def import_folder(self, name: str, source: str | Path) -> ImportReport:
        """Copy the images (and .txt captions) of a folder on the server into dataset `name`."""
        if not str(source or "").strip():
            raise ValueError("enter the path of a folder of images on the server")
        source = Path(str(source).strip()).expanduser()
        if not source.is_dir():
            raise ValueError(f"folder not found: {source}")
        files = [p for p in sorted(source.iterdir()) if p.is_file() and not p.is_symlink()]
        return self.import_files(name, files)

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
        """Rename adapter `old` to `new` (its title inside the file too), with its preview and samples."""
        from studio.adapters import export_adapter

        source = self.existing_adapter(old)
        target = self.adapter_path(new)
        if target.exists():
            raise ValueError(f"an adapter named {new!r} already exists")
        export_adapter(source, target, title=safe_name(new))
        for old_path, new_path in (
            (self.preview_path(old), self.preview_path(new)),
            (self.samples_dir(old), self.samples_dir(new)),
        ):
            if old_path.exists():
                old_path.rename(new_path)
        source.unlink()
        return target

    def delete_adapter(self, name: str) -> None:
        """Delete adapter `name`, its preview and its final samples (training runs are kept)."""
        self.existing_adapter(name).unlink()
        self.preview_path(name).unlink(missing_ok=True)
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
            hashes[hashlib.sha256(path.read_bytes()).hexdigest()] = path.name
    return hashes


def _unique(folder: Path, file_name: str) -> Path:
    target = folder / file_name
    stem, suffix = target.stem, target.suffix
    counter = 1
    while target.exists():
        target = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return target


def _add_file(original: str, handle, folder: Path, seen: dict[str, str], report: ImportReport, limit: int) -> int:
    """Copy at most `limit` bytes from `handle` into `folder` under a sanitised name; return bytes written."""
    try:
        file_name = sanitize_filename(original)
    except ValueError:
        report.skipped.append((original, "file name cannot be made safe"))
        return 0
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"upload is larger than the {MAX_IMPORT_BYTES // 1024**2} MiB limit")
    if not data:
        report.skipped.append((original, "empty file (0 bytes)"))
        return 0
    is_caption = file_name.lower().endswith(CAPTION_SUFFIX)
    if is_caption:
        target = folder / file_name  # a caption replaces the old one for the same image
    else:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.skipped.append((original, f"duplicate of {seen[digest]}"))
            return len(data)
        target = _unique(folder, file_name)
        seen[digest] = target.name
    atomic.write_bytes(target, data)
    report.added.append(target.name)
    return len(data)


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


def _import_zip(path: Path, folder: Path, seen: dict[str, str]) -> ImportReport:
    report = ImportReport()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path.name} is not a valid zip file ({exc})") from None
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        if len(entries) > MAX_ZIP_ENTRIES:
            raise ValueError(f"{path.name} holds {len(entries)} files; the limit is {MAX_ZIP_ENTRIES}")
        if sum(i.file_size for i in entries) > MAX_IMPORT_BYTES:
            raise ValueError(f"{path.name} unpacks to more than the {MAX_IMPORT_BYTES // 1024**2} MiB limit")
        budget = MAX_IMPORT_BYTES
        for info in entries:
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if base.startswith(".") or "__MACOSX" in info.filename:
                continue
            problem = _unsafe_zip_entry(info)
            if problem:
                report.skipped.append((info.filename, f"refused: {problem}"))
                continue
            suffix = PurePosixPath(base).suffix.lower()
            if suffix not in IMAGE_SUFFIXES + (CAPTION_SUFFIX,):
                report.skipped.append((info.filename, f"not an image ({suffix or 'no suffix'})"))
                continue
            try:
                with archive.open(info) as handle:
                    budget -= _add_file(base, handle, folder, seen, report, budget)
            except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                report.skipped.append((info.filename, f"cannot be read from the zip ({exc})"))
    return report
