"""Text to tokens and the token sets the stages read: prompts, answer letters, what ends a reply."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from kb.data import LETTERS


def encode(tokenizer: Any, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, exactly as the stages feed them to the model.

    A chat template already writes the BOS token into the text; plain prompts get the usual specials.
    One batched call: fast tokenizers encode the list in parallel (14k 5-shot MMLU prompts are ~10M tokens)."""
    ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"] if prompts else []
    return [x if isinstance(x, list) else list(x) for x in ids]


class TokenStream(Sequence[list[int]]):
    """`encode`'s token ids, produced group by group in a background thread while the caller uses the first.

    Why: full MMLU 5-shot is ~10M prompt tokens, seconds of tokenisation that a GPU would otherwise wait
    for; groups (subjects) are encoded in order of first appearance, the order kb.engine.plan's batches come
    in, so the scorer starts on the first subject while the rest are encoded (fast tokenizers encode
    outside the GIL). Reading a prompt waits for its group; an encoding error is raised to the reader.
    """

    def __init__(self, tokenizer: Any, prompts: Sequence[str], chat: bool, groups: Sequence[str] | None = None) -> None:
        order: dict[str, list[int]] = {}
        for i, g in enumerate(groups if groups is not None else [""] * len(prompts)):
            order.setdefault(g, []).append(i)
        self._chunks = list(order.values())
        self._chunk_of = [0] * len(prompts)
        for k, idx in enumerate(self._chunks):
            for i in idx:
                self._chunk_of[i] = k
        self._ids: list[list[int] | None] = [None] * len(prompts)
        self._ready = [threading.Event() for _ in self._chunks]
        self._error: BaseException | None = None
        self.seconds = 0.0  # the encoding thread's wall time, start to end (seen once `wait()` returns)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tokenizer, prompts, chat), daemon=True,
                                        name="kb-tokenize")
        self._thread.start()

    def _run(self, tokenizer: Any, prompts: Sequence[str], chat: bool) -> None:
        t0 = time.perf_counter()
        try:
            for k, idx in enumerate(self._chunks):
                for i, ids in zip(idx, encode(tokenizer, [prompts[i] for i in idx], chat)):
                    self._ids[i] = ids
                self._ready[k].set()
        except BaseException as err:  # noqa: BLE001 - handed to the reader, who raises it
            self._error = err
        finally:
            self.seconds = time.perf_counter() - t0
            for ev in self._ready:
                ev.set()
            self._done.set()

    def wait(self) -> TokenStream:
        """Block until every prompt is encoded (raises the encoding error, if any)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> list[int]:  # type: ignore[override]
        ids = self._ids[i]
        if ids is None:
            self._ready[self._chunk_of[i]].wait()
            if self._error is not None:
                raise self._error
            ids = self._ids[i]
            assert ids is not None
        return ids


def letter_candidates(tokenizer: Any, n: int = len(LETTERS), rule: str = "summed_variants") -> list[list[int]]:
    """Token ids that count as each letter under `rule` (kb.prompts.letter_rule).

    summed_variants: the single tokens spelling 'A' and ' A' (after a chat header or "Answer: ").
    harness: the one token lm-evaluation-harness scores as the continuation " A" after "Answer:"
    (the tokens "Answer: A" adds to "Answer:")."""
    if rule not in ("harness", "summed_variants"):
        raise ValueError(f"unknown letter rule {rule!r}")
    out = []
    for letter in LETTERS[:n]:
        ids: list[int] = []
        if rule == "harness":
            ctx = tokenizer.encode("Answer:", add_special_tokens=False)
            whole = tokenizer.encode("Answer: " + letter, add_special_tokens=False)
            if whole[:len(ctx)] == ctx and len(whole) == len(ctx) + 1:
                ids.append(whole[-1])
            else:  # more than one token (Gemma-3's GGUF tokenizer under transformers 5.17): the summed variants
                return letter_candidates(tokenizer, n, "summed_variants")
        else:
            for text in (letter, " " + letter):
                toks = tokenizer.encode(text, add_special_tokens=False)
                if len(toks) == 1 and toks[0] not in ids:
                    ids.append(toks[0])
        if not ids:
            raise ValueError(f"tokenizer has no single token for letter {letter!r}")
        out.append(ids)
    return out


def newline_token_ids(tokenizer: Any) -> set[int]:
    """Every token whose text contains a line break (decoded one by one, once per tokenizer)."""
    key = (tokenizer.name_or_path, len(tokenizer))
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NEWLINE_IDS[key] = {i for i, t in enumerate(texts) if "\n" in t}
    return _NEWLINE_IDS[key]


_NEWLINE_IDS: dict[tuple[str, int], set[int]] = {}


def generation_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """What ends a reply: the tokenizer's EOS and the generation config's (generate's rule)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return sorted(i for i in ids if i is not None)
