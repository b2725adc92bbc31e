"""Config precedence for every stage: argparse defaults < --config YAML < command-line flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

from kb.errors import KbError
from kb.paths import repo_path


def load_yaml(path: str) -> dict[str, Any]:
    p = repo_path(path)
    if not p.is_file():
        raise KbError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise KbError(f"{p}: malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KbError(f"{p}: a config must be a mapping of option: value")
    return data


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, letting a --config YAML fill in defaults; unknown YAML keys are errors."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="YAML file of option: value (flags override it)")
    first, _ = parser.parse_known_args(argv)
    if first.config:
        data = load_yaml(first.config)
        dests = {a.dest for a in parser._actions}
        norm = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(k for k in norm if k not in dests or k in {"help", "config"})
        if unknown:
            raise KbError(f"{repo_path(first.config)}: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(d for d in dests if d not in {'help', 'config'}))}")
        for action in parser._actions:
            if action.dest in norm and action.choices is not None and norm[action.dest] not in action.choices:
                raise KbError(f"{repo_path(first.config)}: field '{action.dest}': {norm[action.dest]!r} "
                              f"not one of {list(action.choices)}")
        parser.set_defaults(**norm)
    args = parser.parse_args(argv)
    if hasattr(args, "data_root"):
        from kb.data import set_data_root

        set_data_root(args.data_root)
    return args


def add_common_args(parser: argparse.ArgumentParser, *, model: bool = True, queries: bool = True) -> None:
    """Flags shared by every stage, with the same names everywhere.

    model: the flags that load a model; queries: those of stages that run a model over questions
    (subset, batching, resume), left out where they would be accepted and ignored."""
    if model:
        parser.add_argument("--model", default="smollm2-135m",
                            help="offline alias (smollm2-135m, gemma3-270m), hub id, local dir or .gguf file")
        parser.add_argument("--adapter", default=None, help="PEFT adapter dir to load on top of --model")
        parser.add_argument("--trust-remote-code", action="store_true", help="needed for Qwen-7B / chatglm2-6b")
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
