"""Shared UI plumbing: readable errors instead of stack traces, number parsing, and the loaded base model."""

from __future__ import annotations

import functools
import logging
import math
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from studio.compose import AdapterStack
from studio.models import BaseModel, load_base, resolve_spec

logger = logging.getLogger(__name__)
# the model picker's choices; "auto" lets the file's metadata, a .yaml beside it, or the family's default decide
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
# Errors a user can cause and fix; their message is shown as is.
EXPECTED_ERRORS = (ValueError, OSError, KeyError, zipfile.BadZipFile)


def error_text(exc: BaseException) -> str:
    """A readable one-paragraph message for an exception (never a stack trace)."""
    if isinstance(exc, KeyError):
        return f"**Error:** unknown value {exc}"
    if isinstance(exc, EXPECTED_ERRORS):
        return f"**Error:** {exc}"
    return f"**Error:** unexpected {type(exc).__name__}: {exc} (details are in the server log)"


def reports_errors(outputs: int, status: int) -> Callable:
    """Decorate a handler so any exception becomes a message in output `status`; other outputs stay unchanged."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(*args: Any, **kwargs: Any):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not isinstance(exc, EXPECTED_ERRORS):
                    logger.exception("handler %s failed", fn.__name__)
                values = [gr.skip() for _ in range(outputs)]
                values[status] = error_text(exc)
                return values[0] if outputs == 1 else tuple(values)

        return handler

    return wrap


def whole_number(value: Any, label: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int, or a ValueError naming `label` (blank, fractional and out-of-range values included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    _check_range(number, label, minimum, maximum)
    return int(number)


def real_number(value: Any, label: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float, or a ValueError naming `label`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    _check_range(number, label, minimum, maximum)
    return number


def _check_range(number: float, label: str, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ValueError(f"{label} must be at least {minimum:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{label} must be at most {maximum:g}, got {number:g}")


def number_list(text: str, label: str, kind: type = float) -> list:
    """Comma- or space-separated numbers ("0, 0.5, 1") as a list; a ValueError naming `label` otherwise."""
    parts = [p for p in (text or "").replace(",", " ").split() if p]
    if not parts:
        raise ValueError(f"{label}: give at least one number")
    convert = whole_number if kind is int else real_number
    return [convert(p, label) for p in parts]


def uploaded_paths(files: Any) -> list[Path]:
    """File paths from a gr.File value (a path, a list of paths, or file objects)."""
    if not files:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [Path(f) if isinstance(f, (str, Path)) else Path(f.name) for f in files]


class ModelCache:
    """The loaded base model (one at a time, server-wide) and its adapter stack; `lock` serialises pipeline use."""

    def __init__(self, loader: Callable[..., BaseModel] = load_base):
        self._loader = loader
        self.lock = threading.RLock()
        self.prediction_type: str | None = None  # None: decided by the model (see load_base)
        self._loaded_for: tuple[str, str | None] | None = None  # (spec, prediction type) of `_base`
        self._base: BaseModel | None = None
        self._stack: AdapterStack | None = None

    def get(self, spec: str) -> BaseModel:
        """The base model for `spec`, loading it (and dropping the previous one) if needed."""
        spec = (spec or "").strip()
        with self.lock:
            chosen = self.prediction_type
            if self._base is None or (spec, chosen) != self._loaded_for:
                resolve_spec(spec)  # a readable error before the slow part
                self._base, self._stack, self._loaded_for = None, None, None
                self._base = self._loader(spec) if chosen is None else self._loader(spec, prediction_type=chosen)
                self._stack = AdapterStack(self._base)
                self._loaded_for = (spec, chosen)
            return self._base

    def set_prediction_type(self, choice: str) -> None:
        """Load with `choice` ("auto", "epsilon", "v_prediction") from the next use on; SD 2.x single files need it."""
        if choice not in PREDICTION_TYPES:
            raise ValueError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, not {choice!r}")
        with self.lock:
            self.prediction_type = None if choice == "auto" else choice

    def stack(self, spec: str) -> AdapterStack:
        """The adapter stack installed on the base model for `spec`."""
        with self.lock:
            self.get(spec)
            return self._stack

    @property
    def loaded(self) -> BaseModel | None:
        """The model currently in memory, if any."""
        return self._base

    def describe(self) -> str:
        """What is loaded, as Markdown."""
        base = self._base
        if base is None:
            return "No base model loaded yet (it loads on first use)."
        size = base.native_size
        predicts = base.pipeline.scheduler.config.get("prediction_type", "epsilon")
        text = f"Loaded: **{base.name}** - {base.family.label}, native size {size}x{size}, predicts {predicts}"
        if self.prediction_type not in (None, predicts):
            text += f" ({self.prediction_type} from the next use: it reloads)"
        return text
