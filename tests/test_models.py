"""Model resolution: aliases, paths, hub ids; the original study's architectures."""

from __future__ import annotations

import pytest
import torch

from kb.errors import KbError
from kb.models import REMOTE_CODE_MODELS, load_model, resolve_model


def test_unknown_alias_lists_what_was_tried():
    with pytest.raises(KbError) as err:
        resolve_model("smollm3")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "gemma3-270m" in msg and "hub id" in msg


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KbError) as err:
        load_model("openlm-research/open_llama_3b", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "open_llama_3b" in msg and "huggingface-cli download" in msg


def test_hub_ids_resolve_and_remote_code_flagged():
    assert resolve_model("Qwen/Qwen-7B")[1] == "Qwen-7B"
    assert {"Qwen/Qwen-7B", "THUDM/chatglm2-6b"} == REMOTE_CODE_MODELS


def test_open_llama_3b_architecture_builds():
    """open_llama_3b is a native Llama: its real config builds (on the meta device, no memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                      num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 3.3e9 < n < 3.6e9


def test_local_dir_loads_and_fingerprints(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.label == "tiny-llama" and len(lm.fingerprint) == 16 and lm.dtype == "float32"
    assert lm.tokenizer.pad_token_id is not None


def test_dir_without_config(tmp_path):
    with pytest.raises(KbError, match="no config.json"):
        resolve_model(str(tmp_path))
