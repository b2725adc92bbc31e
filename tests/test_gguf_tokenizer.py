"""A GGUF-converted tokenizer is made to honour the GGUF header (<bos>, end-of-sequence, vocabulary model)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kb.errors import KbError
from kb.gguf_tokenizer import GgufTokenizerSpec, conform_tokenizer, read_gguf_tokenizer_spec

VOCAB = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "▁"]


def bpe_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(VOCAB)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.Unigram([(t, -1.0) for t in VOCAB], unk_id=3))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


SPEC = GgufTokenizerSpec(model="llama", bos_token="<bos>", eos_token="<eos>", add_bos_token=True)


def test_missing_bos_is_prepended_and_a_second_pass_changes_nothing(tmp_path):
    tok = bpe_tokenizer(bos_token="<bos>", eos_token="<eos>")
    assert tok("ab a")["input_ids"] == [6, 4]
    assert conform_tokenizer(tok, SPEC, tmp_path / "m.gguf") == ["prepend <bos>"]
    assert tok("ab a")["input_ids"] == [2, 6, 4]
    assert conform_tokenizer(tok, SPEC, tmp_path / "m.gguf") == []
    tok.save_pretrained(tmp_path / "saved")  # the repair survives a save, as the conversion cache needs
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "saved")("ab")["input_ids"] == [2, 6]


def test_wrong_special_tokens_are_taken_from_the_header(tmp_path):
    tok = bpe_tokenizer(bos_token="<pad>", eos_token="<bos>")
    spec = GgufTokenizerSpec(model="gpt2", bos_token="<bos>", eos_token="<eos>", add_bos_token=False)
    fixes = conform_tokenizer(tok, spec, tmp_path / "m.gguf")
    assert fixes == ["eos_token '<bos>' -> '<eos>'", "bos_token '<pad>' -> '<bos>'"]
    assert (tok.eos_token_id, tok.bos_token_id) == (1, 2)
    assert tok("ab")["input_ids"] == [6]  # the header does not ask for <bos>, so none is added


def test_a_sentencepiece_vocabulary_read_as_unigram_is_an_error(tmp_path):
    with pytest.raises(KbError, match=r"m\.gguf: transformers .* Unigram .* >= 5\.18"):
        conform_tokenizer(unigram_tokenizer(), SPEC, tmp_path / "m.gguf")
    unigram_spec = GgufTokenizerSpec(model="t5", bos_token="<bos>", eos_token="<eos>", add_bos_token=False)
    assert conform_tokenizer(unigram_tokenizer(), unigram_spec, tmp_path / "m.gguf") == []


def test_spec_is_read_from_a_gguf_header(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_tokenizer_spec(path) == SPEC


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_offline_models_tokenizers_agree_with_their_headers(alias):
    """The two offline GGUFs, read by this transformers and conformed, tokenise as their headers say."""
    from transformers import AutoTokenizer

    from kb.gguf import offline_gguf_path

    path = offline_gguf_path(alias)
    spec = read_gguf_tokenizer_spec(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    conform_tokenizer(tok, spec, path)
    ids = tok("Question: Where was Nicolas Sarkozy born?")["input_ids"]
    assert (ids[0] == tok.bos_token_id) == spec.add_bos_token
    assert tok.eos_token == spec.eos_token
    words = tok.convert_ids_to_tokens(ids[1:3] if spec.add_bos_token else ids[:2])
    assert [w.lstrip("▁Ġ") for w in words] == ["Question", ":"]
