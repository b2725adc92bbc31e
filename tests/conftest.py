"""Shared fixtures: tiny random models saved once per session, and the real SmolLM2 loaded once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from kb.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from kb.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    from kb.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")
