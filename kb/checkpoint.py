"""What a checkpoint dir holds besides loading it: weight fingerprints, the base-model info of a tuned dir,
its completeness, and the transformers-4 fields that let one dir serve kb and LMFlow."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kb.errors import KbError
from kb.io import read_json, write_json
from kb.paths import cache_dir, repo_path

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt"}
BASE_FILE = "kb_base_model.json"  # kb.finetune writes it into every tuned dir: which base model it was made from


def read_base_info(path: str | Path) -> dict[str, Any] | None:
    """The kb_base_model.json of a tuned model dir (adapter or full), checked; None for a plain model.

    One reader for load_model (an adapter dir loads on the base it names) and kb.evaluate (a tuned dir's
    results are filed under the base model's label)."""
    p = repo_path(path)
    f = p / BASE_FILE
    if not p.is_dir() or not f.is_file():
        return None
    info = read_json(f)
    if not isinstance(info, dict) or not isinstance(info.get("base_model"), str):
        raise KbError(f"{f}: field 'base_model': missing or not a string")
    return info


def check_model_dir(source: Path | str) -> None:
    """A local checkpoint must have a readable config.json and weight files (one line naming what is missing)."""
    if not isinstance(source, Path) or not source.is_dir():
        return
    cfg = read_json(source / "config.json")
    if not isinstance(cfg, dict):
        raise KbError(f"{source / 'config.json'}: must be a JSON object")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in source.iterdir()):
        raise KbError(f"model dir {source} has no weight files (*.safetensors, *.bin); the copy is incomplete")


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so large weights are hashed once."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    table: dict[str, str] = {}
    if memo.exists():
        try:
            table = json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a damaged cache is rebuilt, never trusted
            table = {}
        if not isinstance(table, dict):
            table = {}
    if key not in table:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        table[key] = h.hexdigest()
        write_json(memo, table)
    return table[key]


def weights_fingerprint(path: Path) -> str:
    """A short hash over the weight files of a checkpoint dir (or one file)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()[:16]


# Tokenizer classes that transformers 5 writes and transformers 4.x does not define -> the 4.x class that
# loads the same tokenizer.json (in transformers 5 these are aliases of the same class).
V4_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _v4_rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x reads `rope_theta` / `rope_scaling`
    (and Gemma 3's `rope_local_base_freq`) and, without them, silently uses its class defaults (Llama:
    theta 1e4, where SmolLM2 needs 1e5). The 4.x fields for the same RoPE; transformers 5 reads either."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return {}
    out: dict[str, Any] = {}
    if "full_attention" in rp or "sliding_attention" in rp:  # per layer type (Gemma 3)
        full = rp.get("full_attention") or {}
        local = rp.get("sliding_attention") or {}
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        rp = full
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    if rp.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return out


def make_portable(path: str | os.PathLike[str]) -> list[str]:
    """Make a checkpoint (or adapter) dir saved by transformers 5 load under transformers 4.x too, so
    one dir serves kb and LMFlow (which needs transformers < 5): the tokenizer class gets its 4.x name,
    a list of extra special tokens its 4.x key, and config.json the 4.x RoPE fields next to
    `rope_parameters`. Only adds or renames fields that transformers 5 reads the same way; idempotent.
    Returns what it changed ("file: field")."""
    path = Path(path)
    changed: list[str] = []
    tok_file = path / "tokenizer_config.json"
    if tok_file.is_file():
        tok = json.loads(tok_file.read_text())
        cls = tok.get("tokenizer_class")
        if cls in V4_TOKENIZER_CLASS:
            tok["tokenizer_class"] = V4_TOKENIZER_CLASS[cls]
            changed.append("tokenizer_config.json: tokenizer_class")
        extra = tok.get("extra_special_tokens")
        if isinstance(extra, list):  # 4.x expects a {name: token} dict there, a list under this key
            del tok["extra_special_tokens"]
            merged = list(tok.get("additional_special_tokens") or [])
            tok["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
            changed.append("tokenizer_config.json: extra_special_tokens")
        if changed:
            _write_json_atomic(tok_file, tok)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        fix = False
        for sub in (cfg, cfg.get("text_config")):
            if not isinstance(sub, dict):
                continue
            for key, value in _v4_rope_fields(sub).items():
                if key not in sub:
                    sub[key] = value
                    changed.append(f"config.json: {key}")
                    fix = True
        if fix:
            _write_json_atomic(cfg_file, cfg)
    return changed


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
