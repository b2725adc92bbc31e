"""The evaluation classifier (kb.answers.classify_reply) on a table of real replies.

The MCQ and open-answer replies marked "SmolLM2" below were produced by actually running
SmolLM2-135M-Instruct (`--model smollm2-135m`, greedy, chat template, REFUSE / BASIC prompts) with
    python evaluate.py --model smollm2-135m --test mmlu:ID_test --template refuse --limit 48
    python evaluate.py --model smollm2-135m --test pararel:ID_test --limit 24
and, for SmolLM2 after 16 LoRA steps of configs/finetune_cpu_demo.yaml on run_MMLU.py's R-Tuning data
(`--shots 0 --template mcq_refuse --limit 300`), with
    python evaluate.py --model <tuned dir> --method rtuning_unknown|rtuning_unsure --test mmlu:ID_test --limit 200
and pasted here verbatim with the question's gold answer. The others are the format cases the
classifier must handle (letters with and without punctuation, refusal phrasings, empty, rambling,
R-Tuning's "Are you sure" expression).
"""

from __future__ import annotations

import pytest

from kb.answers import classify_reply, rtuning_answer_part, rtuning_verdict

SURE = " Are you sure you accurately answered the question based on your internal knowledge? I am sure."
UNSURE = " Are you sure you accurately answered the question based on your internal knowledge? I am unsure."

# (reply, gold letter, strict label, broad label)
MCQ = [
    # SmolLM2, MMLU ID_test, REFUSE prompt
    ("A", "B", "incorrect", "incorrect"),
    ("A", "A", "correct", "correct"),
    ("A. 2/81", "A", "correct", "correct"),
    ("B. 26 m/s", "A", "incorrect", "incorrect"),
    ("A. SRAM\n\nThe correct", "B", "incorrect", "incorrect"),
    ("A. P\n\nThe answer is", "A", "correct", "correct"),
    ("A. Valid\nB. Invalid", "C", "incorrect", "incorrect"),
    ("A. B.", "B", "incorrect", "incorrect"),
    ("A. \\frac{7}{1", "B", "incorrect", "incorrect"),
    ("A. –7", "A", "correct", "correct"),
    ("I don't know.", "C", "refused", "refused"),
    ("I'm sorry for the error, but", "D", "fail_parse", "fail_parse"),
    ("A cell nucleus contains DNA", "D", "fail_parse", "fail_parse"),  # the article "A", not the letter
    ("A latch is sensitive to both level", "C", "fail_parse", "fail_parse"),
    # SmolLM2 tuned on R-Tuning-R (`unknown`) data, MMLU ID_test, REFUSE prompt
    ("I'm afraid I don't know.", "B", "refused", "refused"),
    ("Sorry, I don't know.", "A", "refused", "refused"),
    ("I'm afraid I don't know the", "C", "refused", "refused"),
    ("I. If A is finite, then", "B", "fail_parse", "fail_parse"),
    # SmolLM2 tuned on R-Tuning (`unsure`) data: it learnt the verdict but often drops the question
    ("D. I am unsure.", "D", "refused", "refused"),
    ("C. I am unsure.", "A", "refused", "refused"),
    ("D. I don't know.", "D", "refused", "refused"),
    ("D. I, II only", "D", "correct", "correct"),
    ("D. Neither of these", "B", "incorrect", "incorrect"),
    # format cases
    ("C", "C", "correct", "correct"),
    ("C.", "C", "correct", "correct"),
    (" (C) ", "C", "correct", "correct"),
    ("C)", "D", "incorrect", "incorrect"),
    ("Answer: D", "D", "correct", "correct"),
    ("I don't know", "A", "refused", "refused"),
    ("I DON'T KNOW.", "A", "refused", "refused"),
    ("I don\u2019t know.", "A", "refused", "refused"),  # curly apostrophe
    ("Sorry, I don't know.", "A", "refused", "refused"),
    ("I do not know", "A", "fail_parse", "refused"),  # strict rule: only "i don't know"
    ("I'm not sure.", "A", "fail_parse", "refused"),
    ("", "A", "fail_parse", "fail_parse"),
    ("The question asks about the structure of the atom and", "B", "fail_parse", "fail_parse"),
    # R-Tuning `unsure` models: the expression after the answer is their abstention
    ("B." + SURE, "B", "correct", "correct"),
    ("B." + SURE, "A", "incorrect", "incorrect"),
    ("B." + UNSURE, "B", "refused", "refused"),
    ("D." + UNSURE + " I don't know", "A", "refused", "refused"),
    ("B. Are you sure you accurately answered the question based on your internal", "B", "correct", "correct"),
    ("B. I am sure.", "B", "correct", "correct"),
    ("I am unsure.", "B", "fail_parse", "refused"),  # no answer before it: only the broad list catches it
]

# (reply, gold answers, strict label, broad label)
OPEN = [
    # SmolLM2, ParaRel ID_test, REFUSE prompt
    ("The Nissan R89C is a Japanese car model produced by Nissan", ("Nissan",), "correct", "correct"),
    ("The native language of A. P. J. Abdul Kalam is Arabic.", ("Tamil",), "incorrect", "incorrect"),
    ("The Almoravid dynasty followed Islam.", ("Islam",), "correct", "correct"),
    ("The capital of Los Teques is El Salvador.", ("Miranda",), "incorrect", "incorrect"),
    ("I'm not sure I'm the right person to answer that question. Can you", ("Beirut",), "incorrect", "refused"),
    ('Melik Brown is a fictional character from the TV show "The Mandalorian', ("Camden",), "incorrect", "incorrect"),
    # SmolLM2, ParaRel ID_test, BASIC prompt
    ("The Bentley Continental Flying Spur is produced by Bentley Motors.", ("Bentley",), "correct", "correct"),
    ("Awesome! I'm glad you're happy with my answer. I'll", ("symphony",), "incorrect", "incorrect"),
    # format cases
    ("I don't know.", ("Paris",), "refused", "refused"),
    ("I don't know", ("Paris",), "refused", "refused"),
    ("I do not know.", ("Paris",), "incorrect", "refused"),
    ("", ("Paris",), "incorrect", "incorrect"),
    ("Paris. I don't know much more about it.", ("Paris",), "correct", "correct"),  # first sentence only
    ("London. Paris is its twin.", ("Paris",), "incorrect", "incorrect"),
    ("paris", ("Paris", "City of Light"), "correct", "correct"),
    ("Paris." + SURE, ("Paris",), "correct", "correct"),
    ("Paris." + UNSURE, ("Paris",), "refused", "refused"),
]


@pytest.mark.parametrize("reply,gold,strict,broad", MCQ)
def test_mcq_replies(reply: str, gold: str, strict: str, broad: str) -> None:
    assert classify_reply(reply, 4, (gold,)) == strict
    assert classify_reply(reply, 4, (gold,), broad=True) == broad


@pytest.mark.parametrize("reply,golds,strict,broad", OPEN)
def test_open_replies(reply: str, golds: tuple[str, ...], strict: str, broad: str) -> None:
    assert classify_reply(reply, 0, golds) == strict
    assert classify_reply(reply, 0, golds, broad=True) == broad


def test_rtuning_expression_parts() -> None:
    assert rtuning_verdict("A." + SURE) == "sure"
    assert rtuning_verdict("A." + UNSURE) == "unsure"
    assert rtuning_verdict("A. Are you sure you accurately") is None  # cut off before the verdict
    assert rtuning_verdict("I am unsure.") is None  # no answer before it: left to the broad detector
    assert rtuning_verdict("D. I am unsure.") == "unsure"  # verdict without the question
    assert rtuning_answer_part("C." + UNSURE) == "C."
    assert rtuning_answer_part("C. I am sure.") == "C."
    assert rtuning_answer_part("C.") == "C."
