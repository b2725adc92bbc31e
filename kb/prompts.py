"""Prompt rendering: the one function every stage uses to turn a Sample into model input."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kb.data import LETTERS, Sample, registry
from kb.defaults import declared, kind_declared
from kb.errors import KbError
from kb.statefile import StateRecord

ROLES = ("probe", "query", "basic", "refuse")  # the prompt roles of kb/registry.yaml's `roles`


def templates() -> dict[str, dict[str, str]]:
    return registry()["prompts"]


def prompt_for(dataset: str, role: str, chat: bool = False) -> str:
    """The template a dataset's questions use in `role` (probe, query, basic, refuse), from kb/registry.yaml.

    The one place that decides it, so training (REFUSE) and evaluation prompts cannot drift apart;
    `chat` picks the role's chat-template variant where the registry gives one."""
    entry = declared(dataset, "roles", role)
    name = entry[("chat" if chat else "plain")] if isinstance(entry, dict) else entry
    if name not in templates():
        raise KbError(f"kb/registry.yaml: role {role!r} of dataset {dataset!r} names unknown template {name!r}")
    return str(name)


def budget_for(dataset: str, role: str) -> int:
    """New tokens a dataset's questions may generate in `role` (probe, eval, eval_extra, query), from the registry."""
    return int(declared(dataset, "budgets", role))


def kind_budget(kind: str, role: str) -> int:
    """A kind's registered budget, for CLI defaults set before the dataset is known (query_state.py's flag)."""
    return int(kind_declared(kind, "budgets", role))


def rtuning_strings() -> dict[str, Any]:
    return registry()["rtuning"]


def subject_label(sample: Sample) -> str:
    return sample.group.replace("_", " ") if sample.group else "general knowledge"


def _fields(sample: Sample, with_answer: bool) -> dict[str, str]:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
    return {"question": sample.question, "options": options, "subject": subject_label(sample),
            "answer": sample.answer if with_answer else ""}


@dataclass(frozen=True)
class PromptFormat:
    """How questions become text: a template, k solved shots, and whether to wrap in a chat template."""

    template: str
    shots: int = 0
    chat: bool = False

    def check(self) -> None:
        if self.template not in templates():
            raise KbError(f"unknown prompt template {self.template!r}; registered: {', '.join(templates())}")
        if self.shots and "shot" not in templates()[self.template]:
            raise KbError(f"prompt template {self.template!r} has no few-shot form; use --shots 0")

    def describe(self) -> dict[str, Any]:
        t = templates()[self.template]
        digest = hashlib.sha256(repr(sorted(t.items())).encode()).hexdigest()[:12]
        out = {"template": self.template, "shots": self.shots, "chat_template": self.chat, "template_sha": digest}
        fixed = base_shots(self)
        if fixed:  # recorded only where used, so runs with a chat template keep their old description
            out["base_shots"] = [s.id.split("/", 1)[1] for s in fixed]
        return out


def base_shots(fmt: PromptFormat) -> list[Sample]:
    """The solved examples a prompt gets when it is rendered without a chat template and without
    few-shot examples of its own (the template's `base_shots`; none for most templates)."""
    t = templates()[fmt.template]
    if fmt.chat or fmt.shots or not t.get("base_shots"):
        return []
    examples = registry()["base_examples"]
    out = []
    for name in t["base_shots"]:
        e = examples[name]
        out.append(Sample(id=f"base_example/{name}", question=e["question"], answer=e["answer"],
                          choices=tuple(e.get("choices", ())), group=e.get("subject", "")))
    return out


def render_text(sample: Sample, fmt: PromptFormat, shots: list[Sample]) -> str:
    """The prompt as plain text (before any chat template)."""
    t = templates()[fmt.template]
    fixed = base_shots(fmt)
    parts = []
    if shots and "header" in t:
        parts.append(t["header"].format(**_fields(sample, False)))
    for shot in fixed or shots:
        parts.append(t["shot"].format(**_fields(shot, True)))
    parts.append(t.get("base_item", t["item"]) if fixed else t["item"])
    parts[-1] = parts[-1].format(**_fields(sample, False))
    return "".join(parts)


def apply_chat(tokenizer: Any, text: str) -> str:
    """Wrap a user message in the model's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def render(sample: Sample, fmt: PromptFormat, shots: list[Sample], tokenizer: Any = None) -> str:
    text = render_text(sample, fmt, shots)
    if fmt.chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise KbError("--chat-template on, but the tokenizer has no chat template")
        text = apply_chat(tokenizer, text)
    return text


def resolve_chat(mode: str, tokenizer: Any) -> bool:
    """--chat-template auto|on|off -> bool. auto: on when the tokenizer has a template (instruct models)."""
    if mode not in {"auto", "on", "off"}:
        raise KbError(f"--chat-template must be auto, on or off, not {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise KbError("--chat-template on, but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


LETTER_RULES = ("harness", "summed_variants")


def letter_rule(fmt: PromptFormat) -> str:
    """Which next tokens count as an MCQ letter after this prompt (docs/method.md section 3.1).

    "harness": a raw prompt ending in a non-space character ("...Answer:", the lm-evaluation-harness
    template) is scored as the harness scores it: the continuation " A" alone, so accuracy matches
    published MMLU numbers. "summed_variants": after a chat header or a prompt ending in a space
    (CRaFT's "Answer: "), the model may write "A" or " A"; both are summed.
    """
    t = templates()[fmt.template]
    item = t.get("base_item", t["item"]) if base_shots(fmt) else t["item"]
    return "harness" if not fmt.chat and item and not item[-1].isspace() else "summed_variants"


def join_answer(prompt: str, answer: str) -> str:
    """Text between prompt and answer: a space after 'Answer:', nothing after a newline or space."""
    return "" if not prompt or prompt[-1] in " \n" else " "


# Training data from state records: shared by RAIT sets (kb.rait) and the rehearsal set (kb.rehearsal),
# so both train on exactly the prompt evaluation asks with.


def sample_of(rec: StateRecord) -> Sample:
    """The question of a state record as a Sample, to render prompts without reloading the dataset."""
    return Sample(rec["id"], rec["question"], rec["gold"], tuple(rec.get("choices", ())), tuple(rec.get("aliases", ())),
                  rec["group"])


def training_prompt(rec: StateRecord, tokenizer: Any, chat: bool, dataset: str) -> str:
    """The REFUSE prompt (0-shot) that RAIT and rehearsal data train on: prompt_for(dataset, "refuse"),
    the entry evaluation's REFUSE prompt comes from, so the model trains on the prompt it is tested with."""
    fmt = PromptFormat(prompt_for(dataset, "refuse"), 0, chat)
    fmt.check()
    return render(sample_of(rec), fmt, [], tokenizer)


def training_instance(prompt: str, answer: str) -> dict[str, str]:
    """One LMFlow text2text instance: the answer joined to the prompt as a model would continue it."""
    return {"input": prompt, "output": join_answer(prompt, answer) + answer}


def rtuning_suffix(sure: bool) -> str:
    r = rtuning_strings()
    return r["question"] + (r["sure"] if sure else r["unsure"])


def sure_probe_suffix() -> str:
    """Text after '<answer>.' at which R-Tuning reads p(sure) vs p(unsure): '... knowledge? I am'."""
    r = rtuning_strings()
    return r["question"] + " I am"


def refusal_answer(sample_id: str) -> str:
    """R-Tuning-R's refusal, picked deterministically per question from the registered phrases."""
    phrases = rtuning_strings()["refusals"]
    return phrases[int(hashlib.sha256(sample_id.encode()).hexdigest(), 16) % len(phrases)]
