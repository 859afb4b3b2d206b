"""Shared fixtures: a tiny SD pipeline built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.tiny import build_tiny_pipeline

# Tiny models gain nothing from threads, and two processes (the browser test's server and pytest) each
# spinning two OpenMP threads on two cores slow each other down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline saved as a diffusers folder (random weights, char tokenizer)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_model"), seed=0)
