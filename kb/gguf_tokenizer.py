"""Make a GGUF-converted tokenizer agree with what the GGUF file declares.

transformers rebuilds a GGUF's tokenizer from the file's metadata, and some releases get it wrong in ways
that change every number a study reports without raising anything. Measured on the two offline models:
- transformers 5.17 reads Gemma-3's SentencePiece vocabulary as a Unigram model ('Question' becomes
  'Qu', 'est', 'ion'), so the model sees text it was never trained on and answers with noise;
- transformers 5.17-5.22 drop Gemma-3's <bos>, which the GGUF asks for (`tokenizer.ggml.add_bos_token`);
- transformers 5.17 makes SmolLM2's end-of-sequence token <|im_start|> instead of the GGUF's <|im_end|>,
  so a fine-tune learns to end its answers with the wrong token.
The end-of-sequence and <bos> settings are repaired from the metadata; a wrong vocabulary model cannot be
repaired here and is a one-line error naming the transformers release.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kb.errors import KbError

# A GGUF 'llama' tokenizer is SentencePiece with score-ordered merges (llama.cpp's SPM tokenizer), which
# transformers builds as a BPE model; a Unigram model there segments text differently.
_SPM_MODELS = {"llama"}


@dataclass(frozen=True)
class GgufTokenizerSpec:
    """The tokenizer fields of a GGUF header that a converted tokenizer must honour."""

    model: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool


def read_gguf_tokenizer_spec(path: Path) -> GgufTokenizerSpec:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(f"tokenizer.ggml.{name}")
        return None if f is None else f.contents()

    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(id_field: str) -> str | None:
        idx = field(id_field)
        return None if idx is None or tokens is None else tokens.contents(int(idx))

    return GgufTokenizerSpec(
        model=field("model"),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        add_bos_token=bool(field("add_bos_token")),
    )


def _backend_model_type(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else type(backend.model).__name__


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _prepend_bos(tokenizer: Any, bos: str) -> None:
    from tokenizers.processors import TemplateProcessing

    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def conform_tokenizer(tokenizer: Any, spec: GgufTokenizerSpec, source: Path) -> list[str]:
    """Repair `tokenizer` in place to match `spec`; return what was repaired (empty when nothing was)."""
    import transformers

    kind = _backend_model_type(tokenizer)
    if spec.model in _SPM_MODELS and kind == "Unigram":
        raise KbError(
            f"{source}: transformers {transformers.__version__} reads this GGUF's SentencePiece tokenizer as a "
            "Unigram model, which splits words wrongly; use transformers >= 5.18"
        )
    repaired = []
    if spec.eos_token is not None and tokenizer.eos_token != spec.eos_token:
        repaired.append(f"eos_token {tokenizer.eos_token!r} -> {spec.eos_token!r}")
        tokenizer.eos_token = spec.eos_token
    if spec.bos_token is not None and tokenizer.bos_token != spec.bos_token:
        repaired.append(f"bos_token {tokenizer.bos_token!r} -> {spec.bos_token!r}")
        tokenizer.bos_token = spec.bos_token
    if spec.add_bos_token and spec.bos_token is not None and not _adds_bos(tokenizer):
        _prepend_bos(tokenizer, spec.bos_token)
        repaired.append(f"prepend {spec.bos_token}")
        if not _adds_bos(tokenizer):
            raise KbError(f"{source}: could not make the tokenizer prepend {spec.bos_token} as the GGUF asks")
    return repaired
