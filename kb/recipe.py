"""The fine-tuning recipe: one frozen dataclass whose fields are the keys of configs/finetune_*.yaml.

Why a declaration: every hyperparameter must be set in the recipe, so that no trainer default decides
a run (TRL's own defaults are bf16 and gradient checkpointing on; they would decide a CPU run). The
field list is therefore the schema: a missing or unknown key is an error, and each field's type
(Literal for a choice), help text and lower bound are read from its declaration, so a Recipe that
exists is a valid one. Names follow transformers.TrainingArguments (and LMFlow's flags, which are the
same) wherever one exists. `load_recipe` reads a YAML (with `base: other.yaml` inheritance,
kb.config.load_yaml), applies `--set key=value` overrides and the seed.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kb.config import load_yaml
from kb.errors import KbError
from kb.paths import repo_path

Rule = tuple[Callable[[Any], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, "must be at least 1")
POSITIVE: Rule = (lambda v: v > 0, "must be positive")
STEPS: Rule = (lambda v: v == -1 or v >= 1, "-1 or a positive number")


def _key(doc: str, rule: Rule | None = None, default: Any = MISSING) -> Any:
    """A recipe key: its help text (--help, README) and the rule its value obeys beyond its type."""
    return field(default=default, metadata={"doc": doc, "rule": rule})


@dataclass(frozen=True, kw_only=True)
class LoraRecipe:
    """The recipe's `lora:` block (PEFT's LoraConfig)."""

    r: int = _key("rank")
    alpha: int | float = _key("scaling numerator (scale = alpha / r)")
    dropout: float = _key("dropout on the LoRA input")
    target_modules: list[str] | str = _key("module names to adapt, or 'all-linear'")
    layers: list[int] | None = _key("null: every layer; [i, ...]: only these decoder layers (cheaper backward)")
    bias: Literal["none", "all", "lora_only"] = _key("none | all | lora_only")

    def __post_init__(self) -> None:
        _check_fields(self, "lora.")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise KbError("field 'lora.target_modules': a non-empty list of module names, got []")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Every hyperparameter of one fine-tuning run (field order = the order config.yaml is written in)."""

    tuning: Literal["full", "lora"] = _key("full | lora")
    num_train_epochs: int | float = _key("passes over the training file", POSITIVE)
    max_steps: int = _key("-1: train num_train_epochs; N > 0: stop after N optimizer steps", STEPS)
    learning_rate: float = _key("peak learning rate", POSITIVE)
    lr_scheduler_type: str = _key("linear, cosine, constant, ... (transformers' names)")
    warmup_steps: int | float = _key("int: warm-up steps; float in [0, 1): ratio of all steps")
    weight_decay: float = _key("AdamW weight decay")
    per_device_train_batch_size: int = _key("sequences per device per step", AT_LEAST_1)
    gradient_accumulation_steps: int = _key("micro-batches per optimizer step", AT_LEAST_1)
    max_grad_norm: float = _key("gradient clipping norm")
    optim: str = _key("optimizer name (transformers' OptimizerNames)")
    adam_beta1: float = _key("AdamW beta1")
    adam_beta2: float = _key("AdamW beta2")
    adam_epsilon: float = _key("AdamW epsilon")
    max_length: int = _key("tokens per sequence; longer ones are cut at the end (LMFlow's block_size)", AT_LEAST_1)
    max_train_samples: int | None = _key("null: all instances; N: the first N (LMFlow's flag of the same name)",
                                         AT_LEAST_1)
    seed: int = _key("seeds model init (LoRA), data order and dropout")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _key(
        "auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16")
    gradient_checkpointing: bool = _key("recompute activations to save memory (slower)")
    logging_steps: int = _key("optimizer steps between loss records", AT_LEAST_1)
    save_steps: int = _key("optimizer steps between checkpoints (what a rerun resumes from)", AT_LEAST_1)
    save_total_limit: int = _key("checkpoints kept on disk during training", AT_LEAST_1)
    keep_checkpoints: bool = _key("keep checkpoints/ after a finished run (false: delete them)")
    lora: LoraRecipe | None = _key("null for full fine-tuning; else r, alpha, dropout, target_modules, layers, bias")
    # Added after the first recipes were written: a recipe without it gets this value, which is then
    # written into the resolved config.yaml like every other key.
    train_sampling_strategy: Literal["random", "group_by_length", "sequential"] = _key(
        "random | group_by_length (batches of similar length: less padding, faster on CPU) | sequential",
        default="random")

    def __post_init__(self) -> None:
        _check_fields(self, "")
        if self.tuning == "lora" and self.lora is None:
            raise KbError("tuning is lora but the 'lora' section is null")
        if self.tuning == "full" and self.lora is not None:
            raise KbError("tuning is full but a 'lora' section is set; make it null")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Check a recipe mapping (every key present, none unknown, types and values right)."""
        return _build(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what config.yaml and kb_finetune.json's run_key hold)."""
        return asdict(self)

    def precision_on(self, device: str) -> str:
        """'auto' -> bf16 on a CUDA device with bf16, else fp32 (CPU training in bf16 is slow and lossy)."""
        if self.precision != "auto":
            return self.precision
        if device.startswith("cuda"):
            import torch  # heavy: only when a GPU run asks

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "fp32"


KEYS = tuple(f.name for f in fields(Recipe))
LORA_KEYS = tuple(f.name for f in fields(LoraRecipe))


# ---------------------------------------------------------------- validation from the declaration


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _parts(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _runtime(part: Any) -> type:
    """The class a YAML value of one declared alternative has: Literal['a'] -> str, list[int] -> list."""
    if get_origin(part) is Literal:
        return type(get_args(part)[0])
    if is_dataclass(part):
        return dict
    return get_origin(part) or part


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Type-check one value against its declaration. YAML reads '2e-5' as a string, so floats may be
    given as numeric strings; an int is accepted for a float."""
    parts = _parts(hint)
    for part in parts:
        if is_dataclass(part) and isinstance(value, Mapping):
            return _build(part, value, name, wrap=False)  # a nested section: its own keys and fields
        if is_dataclass(part) and isinstance(value, part):
            return value
    accepted = tuple(_runtime(p) for p in parts)
    if float in accepted and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if float in accepted and isinstance(value, int) and not isinstance(value, bool):
        return value if int in accepted else float(value)
    expected = "/".join(t.__name__ for t in accepted)
    if isinstance(value, bool) and bool not in accepted:
        raise KbError(f"field '{name}': expected {expected}, got a boolean")
    if not isinstance(value, accepted):
        raise KbError(f"field '{name}': expected {expected}, got {value!r}")
    for part in parts:
        if get_origin(part) is Literal and value not in get_args(part):
            raise KbError(f"field '{name}': {value!r} not one of {', '.join(get_args(part))}")
        if get_origin(part) is list and isinstance(value, list):
            item = get_args(part)[0]
            if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise KbError(f"field '{name}': a list of {item.__name__}, got {value!r}")
    return value


def _check_fields(obj: Any, prefix: str) -> None:
    """Coerce and check every field of a just-built recipe dataclass (it is frozen, hence __setattr__)."""
    hints = _hints(type(obj))
    for f in fields(obj):
        value = _coerce(prefix + f.name, getattr(obj, f.name), hints[f.name])
        rule = f.metadata.get("rule")
        if rule is not None and value is not None and not rule[0](value):
            raise KbError(f"field '{prefix}{f.name}': {rule[1]}, got {value!r}")
        object.__setattr__(obj, f.name, value)


def _build(cls: type, data: Mapping[str, Any], where: str, wrap: bool = True) -> Any:
    names = [f.name for f in fields(cls)]
    if not isinstance(data, Mapping):
        raise KbError(f"{where}: a recipe must be a mapping of key: value")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise KbError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(names)}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
    if missing:
        raise KbError(f"{where}: missing key(s) {', '.join(missing)} (every hyperparameter must be set in the recipe)")
    if not wrap:
        return cls(**data)
    try:
        return cls(**data)
    except KbError as err:
        raise KbError(f"{where}: {err}") from None


# ---------------------------------------------------------------- loading


def parse_overrides(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """['learning_rate=1e-4', 'lora.r=8'] -> {'learning_rate': '1e-4', 'lora.r': 8}; values read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise KbError(f"{flag} {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise KbError(f"{flag} {item!r}: value is not valid YAML") from None
    return out


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                seed: int | None = None) -> tuple[Recipe, str]:
    """source (a YAML path or a mapping) < overrides ('key' or 'lora.key') < seed -> (recipe, its name).

    The name (the file's stem, 'custom' for a mapping) names the output dir and is recorded with it."""
    if isinstance(source, Mapping):
        data, name, where = copy.deepcopy(dict(source)), "custom", "recipe"
    else:
        path = repo_path(source)
        data, name, where = load_yaml(str(path)), path.stem, str(path)
    for key, value in (overrides or {}).items():
        head, _, tail = key.partition(".")
        if head not in KEYS or (tail and head != "lora"):
            raise KbError(f"override {key!r}: unknown key; valid: {', '.join(KEYS)}, lora.<{'|'.join(LORA_KEYS)}>")
        if tail:
            if not isinstance(data.get("lora"), dict):
                raise KbError(f"override {key!r}: the recipe has no lora section")
            if tail not in LORA_KEYS:
                raise KbError(f"override {key!r}: unknown lora key; valid: {', '.join(LORA_KEYS)}")
            data["lora"][tail] = value
        else:
            data[head] = value
    if seed is not None:
        data["seed"] = seed
    return Recipe.from_mapping(data, where), name


def lora_layers(layers: list[int] | None, n_layers: int) -> list[int] | None:
    """lora.layers against the model: negative indices count from the top ([-8, ..., -1] = the last 8
    layers of any model, so one recipe serves models of different depth)."""
    if layers is None:
        return None
    out = []
    for i in layers:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise KbError(f"lora.layers: {i!r} is not a layer of this model (it has {n_layers}; use 0..{n_layers - 1} "
                          f"or -{n_layers}..-1)")
        out.append(i % n_layers)
    return sorted(set(out))


def describe_recipe() -> str:
    """The recipe reference (finetune.py --help and the README), from the declaration."""
    lines = [f"  {f.name}: {f.metadata['doc']}" for f in fields(Recipe)]
    lines += [f"    lora.{f.name}: {f.metadata['doc']}" for f in fields(LoraRecipe)]
    return "\n".join(lines)
