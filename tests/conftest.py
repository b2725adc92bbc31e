"""Shared fixtures: tiny random models saved once per session, and the real SmolLM2 loaded once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_MODEL_FIXTURES = {"smollm2"}  # a test that loads a real model is `slow` (pyproject.toml's marker)


def pytest_collection_modifyitems(config, items):
    unmarked = [i.nodeid for i in items if REAL_MODEL_FIXTURES & set(getattr(i, "fixturenames", ()))
                and i.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that load a real model must be marked slow: " + ", ".join(unmarked))


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
