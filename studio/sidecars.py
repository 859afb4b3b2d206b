"""A1111's sidecars of an adapter file: NAME.json (its user metadata), NAME.preview.png, and a cover in the header.

A1111 (extensions-builtin/Lora) reads NAME.json beside NAME.safetensors ("description", "sd version", "activation
text", "preferred weight" where 0 means none, "notes") and shows NAME.preview.png as the card. A1111 and ComfyUI read
`ssmd_cover_images` (a JSON list of base64 images) from the header; SwarmUI reads `modelspec.thumbnail` (a data URL)
and `modelspec.lora_default_weight`. The workspace keeps the same sidecars in adapters/, so that folder is itself an
A1111 LoRA folder."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from studio import atomic
from studio.adapters import export_adapter, read_metadata
from studio.models import FAMILIES, ModelFamily

JSON_SUFFIX = ".json"
PREVIEW_SUFFIX = ".preview.png"
DEFAULT_WEIGHT = 1.0
WEIGHT_LIMIT = 10.0  # the UI's weight range is -10..10
SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # family lineage -> A1111's "sd version"
TEXT_FIELDS = ("description", "sd version", "activation text", "negative text", "notes")
COVER_SIDES = (256, 128, 64)  # longest side of the embedded cover, tried in turn until it fits COVER_MAX_BYTES
COVER_MAX_BYTES = 96 * 1024
MAX_JSON_BYTES = 1 << 20
MAX_PREVIEW_BYTES = 32 << 20
STUDIO = "lora-style-studio"


@dataclass
class Found:
    """What an imported file's sidecars hold: A1111 fields to keep, a preview PNG, and warnings about bad ones."""

    fields: dict[str, Any] = field(default_factory=dict)
    preview: bytes | None = None
    warnings: list[str] = field(default_factory=list)


def json_path(adapter: str | Path) -> Path:
    """NAME.json beside adapter file NAME.safetensors."""
    adapter = Path(adapter)
    return adapter.with_name(adapter.stem + JSON_SUFFIX)


def preview_path(adapter: str | Path) -> Path:
    """NAME.preview.png beside adapter file NAME.safetensors."""
    adapter = Path(adapter)
    return adapter.with_name(adapter.stem + PREVIEW_SUFFIX)


def stated_family(metadata: Mapping[str, str]) -> ModelFamily | None:
    """The family a header states (`ss_base_model_version`, else `modelspec.architecture`), or None."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    by_version = [f for f in FAMILIES.values() if f.ss_base_model_version == version]
    by_architecture = [f for f in FAMILIES.values() if f.modelspec_architecture == architecture]
    return next(iter(by_version + by_architecture), None)


def sd_version(metadata: Mapping[str, str]) -> str:
    """A1111's "sd version" of an adapter: SD1, SD2, SDXL or Unknown."""
    family = stated_family(metadata)
    return SD_VERSIONS.get(family.lineage, "Unknown") if family else "Unknown"


def parse_weight(value: object) -> float:
    """A preferred weight as a number (A1111's 0, "none", becomes 1); a ValueError saying why if it is not one."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        weight = float(value)
    except ValueError:
        raise ValueError(f'"preferred weight" {value!r} is not a number') from None
    if not math.isfinite(weight) or abs(weight) > WEIGHT_LIMIT:
        raise ValueError(f'"preferred weight" {value!r} is outside -{WEIGHT_LIMIT:g}..{WEIGHT_LIMIT:g}')
    return weight or DEFAULT_WEIGHT


def _header_weight(metadata: Mapping[str, str]) -> float:
    try:
        return parse_weight(metadata.get("modelspec.lora_default_weight", DEFAULT_WEIGHT))
    except ValueError:
        return DEFAULT_WEIGHT


def default_fields(metadata: Mapping[str, str]) -> dict[str, Any]:
    """A1111's fields made from an adapter's header: description, sd version, activation text, weight, notes."""
    family = stated_family(metadata)
    trigger = metadata.get("modelspec.trigger_phrase", "").strip()
    description = metadata.get("modelspec.description", "").strip()
    if not description:
        description = f"LoRA for {family.label if family else 'an unknown base model'}"
        description += f"; trigger: {trigger}" if trigger else ""
    facts = [
        form.format(metadata[key])
        for key, form in (("ss_network_dim", "rank {}"), ("ss_network_alpha", "alpha {}"), ("ss_steps", "{} steps"))
        if metadata.get(key, "None") != "None"
    ]
    made_here = STUDIO in metadata.get("ss_training_comment", "")
    notes = (f"Made with {STUDIO}" if made_here else "") + (": " if made_here and facts else "") + ", ".join(facts)
    return {
        "description": description,
        "sd version": sd_version(metadata),
        "activation text": trigger,
        "preferred weight": _header_weight(metadata),
        "notes": notes,
    }


def merged_fields(metadata: Mapping[str, str], user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`default_fields` with the non-empty `user` values over them, except a trigger or base the file states."""
    fields = default_fields(metadata)
    for key, value in (user or {}).items():
        if value in ("", None):
            continue
        if key == "activation text" and metadata.get("modelspec.trigger_phrase", "").strip():
            continue
        if key == "sd version" and fields["sd version"] != "Unknown":
            continue
        fields[key] = value
    return fields


def read_fields(path: str | Path) -> dict[str, Any]:
    """The fields of an A1111 NAME.json, checked; a ValueError naming the file when it is not a usable one."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES >> 20} MiB")
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object of fields")
        for key in TEXT_FIELDS:
            if not isinstance(data.get(key, ""), str):
                raise ValueError(f'"{key}" is not text')
        if "preferred weight" in data:
            data["preferred weight"] = parse_weight(data["preferred weight"])
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not a usable A1111 sidecar: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not a usable A1111 sidecar: not valid JSON ({exc})") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{path.name} is not a usable A1111 sidecar: {reason}") from None
    return data


def stored_fields(adapter: str | Path) -> tuple[dict[str, Any], str | None]:
    """The fields of the NAME.json beside `adapter` ({} if there is none) and a warning if it was unusable."""
    path = json_path(adapter)
    if not path.exists():
        return {}, None
    try:
        return read_fields(path), None
    except ValueError as exc:
        return {}, f"{exc}; left unused"


def preferred_weight(adapter: str | Path) -> float:
    """The weight to use `adapter` at: its NAME.json's "preferred weight", else its header's, else 1."""
    fields, _ = stored_fields(adapter)
    if "preferred weight" in fields:
        return fields["preferred weight"]
    try:
        return _header_weight(read_metadata(adapter))
    except ValueError:
        return DEFAULT_WEIGHT


def trigger(adapter: str | Path, metadata: Mapping[str, str]) -> str:
    """The adapter's trigger: its header's `modelspec.trigger_phrase`, else its NAME.json's "activation text"."""
    stated = metadata.get("modelspec.trigger_phrase", "").strip()
    return stated or str(stored_fields(adapter)[0].get("activation text", "")).strip()


def write_sidecars(
    adapter: str | Path, user: Mapping[str, Any] | None = None, preview: str | Path | bytes | None = None
) -> list[Path]:
    """Atomically write NAME.json (`merged_fields` of the header and `user`) and, from `preview`, NAME.preview.png."""
    adapter = Path(adapter)
    fields = merged_fields(read_metadata(adapter), user)
    written = [json_path(adapter)]
    atomic.write_text(written[0], json.dumps(fields, indent=4, ensure_ascii=False) + "\n")
    if preview is not None:
        target = preview_path(adapter)
        if isinstance(preview, bytes):
            atomic.write_bytes(target, preview)
        elif Path(preview).resolve() != target.resolve():
            with atomic.atomic_path(target) as tmp:
                shutil.copyfile(preview, tmp)
        written.append(target)
    return written


def remove_sidecars(adapter: str | Path) -> None:
    """Delete NAME.json and NAME.preview.png beside `adapter`, if there."""
    json_path(adapter).unlink(missing_ok=True)
    preview_path(adapter).unlink(missing_ok=True)


def _png(data: bytes, name: str) -> bytes:
    """`data` if it is a PNG, else the image it holds as a PNG; a ValueError naming `name` if it holds none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG":
                image.verify()
                return data
            image.load()
            memory = io.BytesIO()
            image.convert("RGB").save(fp=memory, format="PNG")  # into memory, not a file
            return memory.getvalue()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error...) for damaged images
        detail = "unknown format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ValueError(f"{name} is not a readable image ({detail})") from None


def cover_metadata(preview: str | Path) -> dict[str, str]:
    """Header keys `ssmd_cover_images` and `modelspec.thumbnail` holding `preview` as a small PNG ({}: cannot)."""
    try:
        with Image.open(preview) as image:
            picture = image.convert("RGB")
    except Exception:  # PIL's many error types for a damaged image: no cover, the export goes on
        return {}
    for side in COVER_SIDES:
        small = picture.copy()
        small.thumbnail((side, side))
        memory = io.BytesIO()
        small.save(fp=memory, format="PNG", optimize=True)  # into memory, not a file
        if memory.tell() <= COVER_MAX_BYTES:
            encoded = base64.b64encode(memory.getvalue()).decode("ascii")
            return {
                "ssmd_cover_images": json.dumps([encoded]),
                "modelspec.thumbnail": f"data:image/png;base64,{encoded}",
            }
    return {}


def embedded_cover(metadata: Mapping[str, str]) -> bytes | None:
    """The first cover image in a header (`ssmd_cover_images`, else `modelspec.thumbnail`) as PNG bytes, or None."""
    candidates: list[str] = []
    try:
        covers = json.loads(metadata.get("ssmd_cover_images") or "[]")
        candidates += [c for c in covers if isinstance(c, str)] if isinstance(covers, list) else []
    except ValueError:
        pass
    thumbnail = metadata.get("modelspec.thumbnail", "")
    if thumbnail.startswith("data:image/") and ";base64," in thumbnail:
        candidates.append(thumbnail.split(",", 1)[1])
    for text in candidates:
        try:
            return _png(base64.b64decode(text, validate=True), "the embedded cover")
        except ValueError:  # binascii.Error is a ValueError too
            continue
    return None


def gather(source: str | Path, extras: Iterable[str | Path] = ()) -> Found:
    """NAME.json and NAME.preview.png (or NAME.png, else the header's cover) of `source`, from `extras` or beside it."""
    source = Path(source)
    uploaded = {Path(p).name: Path(p) for p in extras}

    def pick(name: str) -> Path | None:
        candidate = uploaded.get(name) if uploaded else source.with_name(name)
        return candidate if candidate is not None and candidate.is_file() else None

    found, used = Found(), set()
    sidecar = pick(source.stem + JSON_SUFFIX)
    if sidecar is not None:
        used.add(sidecar.name)
        try:
            found.fields = read_fields(sidecar)
        except ValueError as exc:
            found.warnings.append(f"{exc}; imported without it")
    for name in (source.stem + PREVIEW_SUFFIX, source.stem + ".png"):
        image = pick(name)
        if image is None or found.preview is not None:
            continue
        used.add(image.name)
        try:
            if image.stat().st_size > MAX_PREVIEW_BYTES:
                raise ValueError(f"{image.name} is larger than {MAX_PREVIEW_BYTES >> 20} MiB")
            found.preview = _png(image.read_bytes(), image.name)
        except (OSError, ValueError) as exc:
            found.warnings.append(f"{exc}; imported without it as the preview")
    if found.preview is None:
        with contextlib.suppress(ValueError):  # an unreadable header is the caller's error to report
            found.preview = embedded_cover(read_metadata(source))
    for name in sorted(set(uploaded) - used - {source.name}):
        found.warnings.append(
            f"{name} was not used: sidecars are named {source.stem}.json and {source.stem}.preview.png"
        )
    return found


def export_with_sidecars(
    source: str | Path, destination: str | Path, *, embed: bool = True, **options: Any
) -> tuple[dict[str, str], list[str]]:
    """`export_adapter` plus the source's sidecars beside the copy (`embed`: cover, trigger, weight in its header)."""
    source, destination = Path(source), Path(destination)
    fields, warning = stored_fields(source)
    warnings = [warning] if warning else []
    updates: dict[str, str] = {}
    activation = str(fields.get("activation text", "")).strip()
    if embed and activation and not read_metadata(source).get("modelspec.trigger_phrase", "").strip():
        updates["modelspec.trigger_phrase"] = activation
    weight = fields.get("preferred weight", DEFAULT_WEIGHT)
    if embed and weight != DEFAULT_WEIGHT:
        updates["modelspec.lora_default_weight"] = f"{weight:g}"
    preview = preview_path(source) if preview_path(source).is_file() else None
    if embed and preview is not None:
        embedded = cover_metadata(preview)
        if not embedded:
            warnings.append(f"{preview.name} could not be embedded in the file as its cover (unreadable or too large)")
        updates.update(embedded)
    metadata = export_adapter(source, destination, metadata_updates=updates, **options)
    write_sidecars(destination, fields, preview)
    return metadata, warnings
