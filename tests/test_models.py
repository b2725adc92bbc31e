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


def test_open_llama_3b_shaped_checkpoint_loads_and_scores_exactly(tmp_path):
    """open_llama_3b is a native Llama with an untied LM head: a scaled-down random checkpoint of its config
    (untied head, its norm epsilon, no chat template) loads through kb.models, takes the engine's cascade
    path, and scores the letters exactly as one plain forward pass does."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kb.engine import PrefixScorer, cascade_supported, letter_candidates
    from kb.testing import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "open_llama_3b-tiny")
    tok.save_pretrained(tmp_path / "open_llama_3b-tiny")
    lm = load_model(str(tmp_path / "open_llama_3b-tiny"), device="cpu", dtype="float32")
    head, emb = lm.model.get_output_embeddings().weight, lm.model.get_input_embeddings().weight
    assert lm.label == "open_llama_3b-tiny" and not lm.model.config.tie_word_embeddings
    assert head.data_ptr() != emb.data_ptr() and cascade_supported(lm.model)
    prefix = tok.encode("The following are multiple choice questions (with answers) about science.\n\n")
    seqs = [prefix + tok.encode(q + "\nA. B. C. D.\nAnswer:") for q in ("What is it?", "Is Paris the capital?")]
    cands = [t for c in letter_candidates(tok, 4, "harness") for t in c]
    logp, _ = PrefixScorer(lm.model, tok.pad_token_id).score(seqs, len(prefix), cands)
    for row, ids in zip(logp, seqs):
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)[cands]
        assert torch.allclose(row, ref, atol=1e-4)


def test_local_dir_loads_and_fingerprints(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.label == "tiny-llama" and len(lm.fingerprint) == 16 and lm.dtype == "float32"
    assert lm.tokenizer.pad_token_id is not None


def test_dir_without_config(tmp_path):
    with pytest.raises(KbError, match="no config.json"):
        resolve_model(str(tmp_path))
