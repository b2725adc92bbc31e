"""The prompts of a knowledge-state query (CRaFT stage 1): its few-shot examples and how they are laid out.

MMLU draws its shots from dev, as the probe does; a dataset without a dev split (ParaRel) from its
training split minus the queried questions. With a chat template the shots are earlier user/assistant
turns, otherwise inline in one text (kb.prompts.render).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kb.answers import normalise
from kb.data import Sample, data_root_path, dataset_spec, load_split, shots_for
from kb.errors import KbError
from kb.prompts import PromptFormat, render, render_text


def shot_layout(fmt: PromptFormat) -> str:
    """How shots are laid out: as earlier chat turns (with a chat template) or inline in one text."""
    return "chat turns" if fmt.chat and fmt.shots else "inline"


def shot_check(fmt: PromptFormat) -> None:
    """Inline shots need the template's `shot` form; chat-turn shots reuse its `item` form."""
    if shot_layout(fmt) == "chat turns":
        PromptFormat(fmt.template, 0, fmt.chat).check()
    else:
        fmt.check()


def render_query(sample: Sample, fmt: PromptFormat, shots: list[Sample], tokenizer: Any) -> str:
    """The query prompt: prompts.render, except that with a chat template each shot is a user turn
    (the template's item) answered by an assistant turn (the gold answer), the usual few-shot for chat models."""
    if shot_layout(fmt) != "chat turns":
        return render(sample, fmt, shots, tokenizer)
    plain = PromptFormat(fmt.template, 0, False)
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": render_text(shot, plain, [])},
                     {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": render_text(sample, plain, [])})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def query_shots(dataset: str, split: str, sample: Sample, k: int, query_ids: set[str],
                data_root: str | Path | None = None) -> list[Sample]:
    """k solved examples for one question, never from the questions being queried.

    MMLU draws from dev (as the probe does). ParaRel has no dev split, so shots come from its training
    split minus every queried question, and, for open answers, minus shots with the same gold answer
    (ParaRel repeats facts in paraphrase: such a shot would hand over the answer).
    """
    if k == 0:
        return []
    spec = dataset_spec(dataset)
    if spec.shots_from is None:
        raise KbError(f"dataset {spec.name!r} has no split to draw few-shot examples from; use --shots 0")
    if spec.shots_from != split and spec.kind == "mcq":
        return shots_for(dataset, k, sample.group, data_root)
    pool = _pool(dataset, spec.shots_from, data_root)
    gold = normalise(sample.answer)
    ok = [s for s in pool if s.id not in query_ids and (spec.kind == "mcq" or normalise(s.answer) != gold)]
    same = [s for s in ok if sample.group and s.group == sample.group]
    chosen = (same + [s for s in ok if not (sample.group and s.group == sample.group)])[:k]
    if len(chosen) < k:
        raise KbError(f"dataset {spec.name}: only {len(chosen)} shots left in {spec.shots_from} outside the queried "
                      f"questions, asked {k}; use --shots 0 or a smaller --limit")
    return chosen


_POOLS: dict[tuple[str, str, Path | None], list[Sample]] = {}


def _pool(dataset: str, split: str, data_root: str | Path | None) -> list[Sample]:
    key = (dataset, split, data_root_path(data_root))
    if key not in _POOLS:
        _POOLS[key] = load_split(dataset, split, data_root)
    return _POOLS[key]
