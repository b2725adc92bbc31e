"""Text from token prompts: greedy replies and sampled answers, on the path each device does best.

CPU (and models the device decoder does not cover): transformers' generate, batched and left-padded,
each prompt prefilled once for its N samples. GPU: kb.engine.decode.Decoder (captured step, samples
keyed by question). The stages call `greedy_texts` and `sample_answers`, which pick the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kb.answers import answer_ended
from kb.engine.decode import decoder_for, use_decoder
from kb.engine.scorer import pack, to_device
from kb.engine.step import answer_end_rule
from kb.engine.tokens import generation_stop_ids


@torch.inference_mode()
def generate(
    model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, *, do_sample: bool = False,
    temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0, want_scores: bool = False,
    stopping_criteria: Any = None,
) -> tuple[list[list[str]], list[list[float | None]] | None]:
    """Batched generation from token lists (left-padded): texts[q][k] and, greedy, mean token log-prob.

    With several return sequences the prompts are prefilled once and their cache shared by the samples.
    On GPU out-of-memory the questions are split in two and retried (the second half samples with seed+1).
    """
    try:
        return _generate(model, tokenizer, seqs, max_new_tokens, do_sample, temperature, num_return_sequences,
                         seed, want_scores, stopping_criteria)
    except torch.cuda.OutOfMemoryError:
        if len(seqs) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(seqs) // 2
        args = (max_new_tokens,)
        kw = dict(do_sample=do_sample, temperature=temperature, num_return_sequences=num_return_sequences,
                  want_scores=want_scores, stopping_criteria=stopping_criteria)
        ta, sa = generate(model, tokenizer, seqs[:half], *args, seed=seed, **kw)  # type: ignore[arg-type]
        tb, sb = generate(model, tokenizer, seqs[half:], *args, seed=seed + 1, **kw)  # type: ignore[arg-type]
        return ta + tb, (sa + sb if sa is not None and sb is not None else None)


def _generate(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool,
              temperature: float, n: int, seed: int, want_scores: bool,
              stopping_criteria: Any = None) -> tuple[list[list[str]], list[list[float | None]] | None]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids, mask, _ = pack(seqs, pad, left=True)
    width = ids.shape[1]
    ids, mask = to_device(ids, device), to_device(mask, device)
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, return_dict_in_generate=True,
        output_scores=want_scores,
    )
    if stopping_criteria is not None:  # e.g. sample_answers' per-row stop once the cut answer is fixed
        gen_kwargs["stopping_criteria"] = stopping_criteria
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    if n > 1 and width > 1 and type(model).__module__.startswith("transformers."):
        # Prefill all but the last prompt token once, then let the n samples share that cache.
        pos = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        pre = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, use_cache=True,
                    logits_to_keep=1)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(n)
        ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        gen_kwargs.update(past_key_values=cache, num_return_sequences=1)
    else:
        gen_kwargs.update(num_return_sequences=n)
    if do_sample:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    new = out.sequences[:, width:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    grouped = [texts[i * n:(i + 1) * n] for i in range(len(seqs))]
    mean_logp = None
    if want_scores:
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).cpu().float()
        stop_ids = {pad, tokenizer.eos_token_id}
        flat_lp: list[float | None] = []
        for r in range(new.shape[0]):
            keep = [j for j in range(new.shape[1]) if int(new[r, j]) not in stop_ids]
            flat_lp.append(float(scores[r, keep].mean()) if keep else None)
        mean_logp = [flat_lp[i * n:(i + 1) * n] for i in range(len(seqs))]
    return grouped, mean_logp


def greedy_texts(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new_tokens: int, *,
                 want_scores: bool = False) -> tuple[list[list[str]], list[list[float | None]] | None]:
    """Greedy replies texts[q][0] and, if asked, each reply's mean token log-prob (device decoder on GPU)."""
    if use_decoder(model):
        return decode_texts(model, tokenizer, seqs, max_new_tokens, want_scores=want_scores)
    return generate(model, tokenizer, seqs, max_new_tokens, want_scores=want_scores)


def sample_answers(model: Any, tokenizer: Any, seqs: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                   seed: int, stop_at_answer_end: bool = True, keys: list[int] | None = None) -> list[list[str]]:
    """N sampled answers per prompt (generate: the prompt is prefilled once and shared by the N samples).

    Rows stop as soon as cut_at_period's answer is fixed, which on CPU saves most of the decoding (a
    small model rambles for the whole token budget). Finished rows keep drawing random numbers (and
    are padded), so the cut answers do not depend on the stop; a test checks that.

    On a GPU (use_decoder) the samples come from the device Decoder (kb.engine.decode): the step is a CUDA
    graph, the answer-end stop is checked on the device, and sample k of question q is drawn with noise keyed
    by (keys[q], k), so it does not depend on the batch (keys default to seed + the row's index).
    """
    if use_decoder(model):
        keys = keys if keys is not None else [seed * 1_000_003 + i for i in range(len(seqs))]
        texts, _ = decode_texts(model, tokenizer, seqs, max_new_tokens, n=n, temperature=temperature, keys=keys,
                                stop_at_answer_end=stop_at_answer_end)
        return texts
    from transformers import StoppingCriteriaList  # only the CPU path needs it; kb loads transformers lazily

    stop = StoppingCriteriaList([_answer_end_criterion(tokenizer, max(len(s) for s in seqs))]) if stop_at_answer_end else None
    texts, _ = generate(model, tokenizer, seqs, max_new_tokens, do_sample=True, temperature=temperature,
                        num_return_sequences=n, seed=seed, stopping_criteria=stop)
    return texts


def _answer_end_criterion(tokenizer: Any, start: int) -> Any:
    from transformers import StoppingCriteria

    class AnswerEnd(StoppingCriteria):
        """Per-row stop at the end of the answer that cut_at_period keeps (the rest would be cut anyway)."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([answer_ended(t) for t in texts], dtype=torch.bool, device=input_ids.device)

    return AnswerEnd()


def decode_texts(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], max_new: int, *, n: int = 1,
                 temperature: float | None = None, keys: Sequence[int] | None = None, want_scores: bool = False,
                 stop_at_answer_end: bool = False) -> tuple[list[list[str]], list[list[float | None]] | None]:
    """generate's result through the device Decoder: texts[q][k] and, if asked, each reply's mean token log-prob."""
    dec = decoder_for(model, tokenizer.pad_token_id, generation_stop_ids(model, tokenizer))
    rule = answer_end_rule(tokenizer, model) if stop_at_answer_end else None
    try:
        out = dec.run(seqs, max_new, n=n, temperature=temperature, keys=keys, want_logps=want_scores, stop_rule=rule)
    finally:
        dec.release()  # the stage's scorer and embedder get the memory back between batches
    texts = [tokenizer.batch_decode([r.tokens for r in row], skip_special_tokens=True) for row in out]
    scores = None
    if want_scores:
        scores = [[(sum(r.logps) / len(r.logps)) if r.logps else None for r in row] for row in out]  # type: ignore[arg-type]
    return texts, scores
