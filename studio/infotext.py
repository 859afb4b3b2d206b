"""A1111 "infotext": the `parameters` text CivitAI and A1111 read from a PNG, and `<lora:...>` prompt tags."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal

# <lora:name:w>, <lora:name:te_w:unet_w>, <lora:name:te=0.3:unet=1>
LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
CIVITAI_LORA_NAME = re.compile(r"[a-zA-Z0-9_.-]+")


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:...>` tag from a prompt: the adapter name and its text-encoder / UNet weights."""

    name: str
    te_weight: float
    unet_weight: float


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"bad weight {text!r} in {tag}: expected a number") from None


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags, and the tags (A1111/Forge syntax)."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        name, rest = match.group(1).strip(), match.group(2)
        fields = [f.strip() for f in rest.split(":")[1:]] if rest else []
        positional = [f for f in fields if "=" not in f]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        unknown = set(named) - {"te", "unet"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} in {match.group(0)}")
        te = _number(named.get("te", positional[0] if positional else "1"), match.group(0))
        unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
        unet = _number(unet_text, match.group(0)) if unet_text is not None else te
        tags.append(LoraTag(name, te, unet))
    cleaned = " ".join(LORA_TAG.sub(" ", prompt).split())
    return cleaned, tags


def lora_tag(name: str, te_weight: float, unet_weight: float) -> str:
    """The `<lora:...>` tag for an adapter at these weights (one number when they are equal)."""
    if te_weight == unet_weight:
        return f"<lora:{name}:{_fmt(te_weight)}>"
    return f"<lora:{name}:{_fmt(te_weight)}:{_fmt(unet_weight)}>"


def _fmt(value: float) -> str:
    """`value` in plain decimals, never an exponent ("1e-05" is not a weight to CivitAI's `[0-9.]+`)."""
    return format(Decimal(repr(float(value) + 0.0)).normalize(), "f")  # + 0.0 turns -0.0 into 0.0


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """A1111's three-part text: prompt, `Negative prompt: ...`, and `Key: value, ...` (values quoted if needed)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = [f"{key}: {_quote(str(value))}" for key, value in params.items() if value not in (None, "")]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from A1111 infotext (the inverse of `format_infotext`)."""
    lines = text.strip().split("\n")
    params_line = lines.pop() if lines and _PAIR.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        params[key.strip()] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def civitai_lora_name(name: str) -> str:
    """`name` made acceptable to CivitAI's LoRA-name parser (`[a-zA-Z0-9_.-]+`)."""
    cleaned = re.sub(r"[^a-zA-Z0-9_.-]+", "_", name).strip("_") or "lora"
    assert CIVITAI_LORA_NAME.fullmatch(cleaned)
    return cleaned
