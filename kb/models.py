"""Model loading: --model (offline alias, GGUF file, local checkpoint, hub id) resolved and loaded, with its
tokenizer and an optional PEFT adapter. GGUF files and the offline aliases: kb.gguf; what a checkpoint dir
holds (fingerprints, a tuned dir's base model): kb.checkpoint."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kb.checkpoint import check_model_dir, read_base_info, weights_fingerprint
from kb.config import gpu_share
from kb.errors import KbError
from kb.gguf import OFFLINE_MODELS, convert_gguf, offline_gguf_path
from kb.io import read_json
from kb.paths import repo_path, slug

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


def attention_dims(cfg: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a text config: grouped-query configs name their key/value
    heads (else one per query head); the head size defaults to hidden size / heads."""
    heads = cfg.num_attention_heads
    return (heads, getattr(cfg, "num_key_value_heads", None) or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


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


def _start_prebuild(source: Path | str, device: str, dtype: str, trust_remote_code: bool, revision: str | None) -> Any:
    """kb.engine.prebuild's background kernel builds for this model's config where kb's kernels run (CUDA
    with Triton), else None: they overlap the tokenizer and weight loading."""
    from transformers import AutoConfig

    from kb.engine.prebuild import start_prebuild

    def config() -> Any:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        return getattr(cfg, "text_config", None) or cfg

    return start_prebuild(config, device, _torch_dtype(dtype))


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

    gpu_share()  # a bad KB_GPU_SHARE fails here, before a stage writes anything
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
    prebuild = None if for_training else _start_prebuild(source, device, dtype, trust_remote_code, revision)
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
    if prebuild is not None:
        prebuild.wait()  # before any caller launches (or captures) on the device
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=base_name if adapter else name, label=label,
        source=str(source), fingerprint=fingerprint, device=device, dtype=dtype, adapter=adapter,
        revision=revision, trust_remote_code=trust_remote_code, extra={"resolved": how},
    )
