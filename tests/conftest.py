"""Fixtures the tests build themselves: the tiny builtin model and the demo data, prepared once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_bundle():
    """A fresh tiny-sd15 model (training mutates its tokenizer and text encoder, so never shared)."""
    from stages.common.models import load_model

    return load_model("builtin:tiny-sd15")


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory) -> Path:
    """builtin:demo run through preprocess (64 px), caption and cache_latents; returns the out folder."""
    from stages.cache_latents.encode import cache_latents
    from stages.cache_latents.settings import CacheSettings
    from stages.caption.captions import write_captions
    from stages.common.models import load_model
    from stages.preprocess.prepare import PreprocessSettings, preprocess_folder, resolve_source

    out = tmp_path_factory.mktemp("demo_out")
    source = resolve_source("builtin:demo", out)
    preprocess_folder(source, out / "preprocess", PreprocessSettings.from_schema(size=(64, 64)))
    write_captions(out / "preprocess", out / "caption", "existing")
    bundle = load_model("builtin:tiny-sd15")
    cache_latents(out / "preprocess", out / "latents", out / "cache" / "latents", bundle.vae, bundle.identity, settings=CacheSettings.from_schema())
    return out


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP model saved in transformers' layout (tests/tiny_clip.py)."""
    from tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip"))
