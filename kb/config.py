"""Config precedence for every stage: argparse defaults < --config YAML < command-line flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from kb.errors import KbError
from kb.io import read_text
from kb.paths import repo_path

BASE_KEY = "base"  # a YAML file may start from another: `base: other.yaml` (path relative to the file)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; nested mappings merge key by key, anything else (null too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; with `base: other.yaml` its keys go on top of that file's (resolved the same way)."""
    p = repo_path(path)
    if not p.is_file():
        raise KbError(f"{p}: config file not found")
    text = read_text(p)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise KbError(f"{p}: malformed YAML ({(str(err).splitlines() or [''])[0]})") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as err:  # e.g. nesting, a bad timestamp
        raise KbError(f"{p}: malformed YAML ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise KbError(f"{p}: a config must be a mapping of option: value")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise KbError(f"{p}: option names must be strings, got {bad[0]!r}")
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        if not isinstance(base, str) or not base:
            raise KbError(f"{p}: field '{BASE_KEY}': expected a YAML file name, got {base!r}")
        if str(p.resolve()) in _seen:
            raise KbError(f"{p}: '{BASE_KEY}' files include each other: {' -> '.join(_seen)}")
        data = _merge(load_yaml(str(p.parent / base), (*_seen, str(p.resolve()))), data)
    return data


def _check_type(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value for one flag, type-checked as the flag would be (argparse converts only strings)."""
    name = f"{where}: field '{action.dest}'"
    if value is None:
        return value
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise KbError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_check_type(argparse.Action([], action.dest, type=action.type), v, where) for v in items]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise KbError(f"{name}: expected a single value, got {value!r}")
    if action.type in (int, float) and not isinstance(value, str):
        if action.type is int and not isinstance(value, int):
            raise KbError(f"{name}: expected an integer, got {value!r}")
        return action.type(value)
    if action.type is not None:
        try:
            return action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise KbError(f"{name}: invalid value {value!r}") from None
    return str(value)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      hint: str = "") -> argparse.Namespace:
    """Parse flags, letting a --config YAML fill in defaults (required flags too); unknown YAML keys are
    errors, followed by `hint` when given (e.g. where a file of another kind belongs)."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="YAML file of option: value (flags override it)")
    args_in = sys.argv[1:] if argv is None else list(argv)
    # The YAML may supply required flags: they are checked on the second pass (--help shows them as required).
    required = [] if {"-h", "--help"} & set(args_in) else [a for a in parser._actions if a.required]
    for action in required:
        action.required = False
    try:
        first, _ = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if first.config:
        data = load_yaml(first.config)
        dests = {a.dest for a in parser._actions}
        norm = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(k for k in norm if k not in dests or k in {"help", "config"})
        if unknown:
            raise KbError(f"{repo_path(first.config)}: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(d for d in dests if d not in {'help', 'config'}))}"
                          + (f" ({hint})" if hint else ""))
        for action in parser._actions:
            if action.dest in norm:
                norm[action.dest] = _check_type(action, norm[action.dest], str(repo_path(first.config)))
                action.required = False  # given by the YAML
            if action.dest in norm and action.choices is not None and norm[action.dest] not in action.choices:
                raise KbError(f"{repo_path(first.config)}: field '{action.dest}': {norm[action.dest]!r} "
                              f"not one of {list(action.choices)}")
        parser.set_defaults(**norm)
    return parser.parse_args(argv)


def add_common_args(parser: argparse.ArgumentParser, *, model: bool = True, queries: bool = True) -> None:
    """Flags shared by every stage, with the same names everywhere.

    model: the flags that load a model; queries: those of stages that run a model over questions
    (subset, batching, resume), left out where they would be accepted and ignored."""
    if model:
        parser.add_argument("--model", default="smollm2-135m",
                            help="offline alias (smollm2-135m, gemma3-270m), hub id, local dir or .gguf file")
        parser.add_argument("--adapter", default=None, help="PEFT adapter dir to load on top of --model")
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="run the model repository's own code (Qwen-7B, chatglm2-6b); needs --revision for a hub id")
        parser.add_argument("--revision", default=None,
                            help="hub commit (40 hex digits) to load: pins the weights and any remote code")
        parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: GPU when available)")
        parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")
        parser.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                            help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    parser.add_argument("--data-root", default="data", help="folder laid out like the repo's data/")
    parser.add_argument("--output-dir", default="training_data", help="per-question records and training data")
    parser.add_argument("--results-dir", default="results", help="summaries, tables, plots")
    parser.add_argument("--seed", type=int, default=0)
    if not queries:
        return
    parser.add_argument("--limit", type=int, default=None, help="use N questions (a seeded random subset)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="max questions per forward pass (default: 16 on CPU; on a GPU 4096, so that the token "
                             "budget sized from free memory sets the batch)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="token budget per forward pass (default: sized from free memory)")
    parser.add_argument("--restart", action="store_true", help="discard existing records instead of resuming")


CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 4096  # on a GPU the memory-sized token budget (kb.engine.auto_token_budget) is the real cap


def default_batch_size(requested: int | None, device: Any) -> int:
    """--batch-size when not given: 16 on CPU (as before), large on a GPU (the token budget decides)."""
    if requested:
        return requested
    return GPU_BATCH_SIZE if str(device).startswith("cuda") else CPU_BATCH_SIZE


SHARE_ENV = "KB_GPU_SHARE"


def gpu_share() -> float | None:
    """The fraction of the GPU's memory this process may use (KB_GPU_SHARE), or None for all of it."""
    raw = os.environ.get(SHARE_ENV, "").strip()
    if not raw:
        return None
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise KbError(f"{SHARE_ENV}={raw!r}: give a fraction of the GPU's memory in (0, 1], e.g. 0.25")
    return share
