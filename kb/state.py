"""Knowledge-state query (CRaFT stage 1, docs/method.md section 4): Cor, Cer and a representation per question.

Multiple choice is exact from one forward pass: the letter distribution after the prompt gives
Cor = p(gold), Cer = sum p log p (or the card's agreement sum p^2; both are stored). Open answers
sample N answers at temperature 1.0; Cor = fraction correct, Cer = mean pairwise cosine of their
sentence embeddings. The representation is the last hidden layer (after the final norm, as in
`hidden_states[-1]`) at the last prompt token, stored as a float16 .npy beside the records.

The same function queries M0 and the rehearsed model M~ (rehearsal_finetune.py), from settings read
back out of M0's meta, so the flow compares like with like: same prompts, same batches, same sampling
seeds per batch (common random numbers, which keeps sampling noise out of the flow). The settings are
kb/state_settings.py's, the prompts and shots kb/state_prompts.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from kb.answers import cut_at_period, open_correct
from kb.checkpoint import weights_fingerprint
from kb.data import LETTERS, Sample, dataset_spec, load_split, subset
from kb.distributed import Dist
from kb.engine import (
    Batch,
    PrefixScorer,
    TokenStream,
    batch_seed,
    iter_batches,
    letter_candidates,
    letter_probs,
    pass_overhead_tokens,
    question_key,
    run_batches,
    sample_answers,
    token_budget,
)
from kb.errors import KbError
from kb.io import write_json
from kb.layout import meta_path, reps_paths, state_records, state_summary, stem_of, wrote
from kb.locks import lock_output, rank_path
from kb.metrics import near_chance
from kb.models import LoadedModel
from kb.paths import repo_path
from kb.prompts import PromptFormat, letter_rule
from kb.provenance import check_resumable, make_meta
from kb.state_prompts import query_shots, render_query, shot_check, shot_layout
from kb.state_settings import QuerySettings, resolve_embedder_name
from kb.statefile import StateFile, agreement, load_npy, load_reps, load_state, mean_pairwise_cosine, neg_entropy

REPRESENTATION = {"layer": "last hidden layer (decoder output after the final norm, = hidden_states[-1])",
                  "token": "last prompt token"}


def load_embedder(name: str, device: str) -> tuple[Any, str]:
    """A SentenceTransformer and a fingerprint of its weights (so M~'s query must use the same one)."""
    from sentence_transformers import SentenceTransformer  # heavy: loaded only for open answers

    path = repo_path(name)
    try:
        model = SentenceTransformer(str(path) if path.exists() else name, device=device)
    except (OSError, ValueError) as err:
        raise KbError(f"embedder {name!r} could not be loaded ({str(err).splitlines()[0][:200]}); pass a local "
                      "sentence-transformers dir with --embedder") from None
    fp = weights_fingerprint(path) if path.is_dir() else f"hub:{name}"
    return model, fp


# ----------------------------------------------------------------------------------------------------
# The query


@dataclass
class StateRun:
    state: StateFile
    summary: dict[str, Any]
    wall_s: float


def run_state_query(settings: QuerySettings, lm: LoadedModel, out_dir: Path, res_dir: Path, name: str, *,
                    restart: bool = False, max_batch_tokens: int | None = None,
                    extra_meta: dict[str, Any] | None = None, dist: Dist | None = None,
                    data_root: str | Path | None = None) -> StateRun | None:
    """Query (or resume querying) the state of every question into out_dir's state file of set `name`
    (kb.layout.state_records; its summary into res_dir); returns the validated state file.

    Under torchrun / accelerate launch (`dist`, kb/distributed.py) every rank takes a share of the batches,
    writes its rows of the one representation file and its own record shard; rank 0 merges the shards into
    the single-process file and returns the result, the other ranks return None.
    """
    dist = dist or Dist()
    t0 = time.perf_counter()
    spec = dataset_spec(settings.dataset)
    kind = spec.kind
    samples = subset(load_split(settings.dataset, settings.split, data_root), settings.limit, settings.seed)
    tok = lm.tokenizer
    fmt = PromptFormat(settings.template, settings.shots, settings.chat)
    shot_check(fmt)
    if settings.chat and not getattr(tok, "chat_template", None):
        raise KbError(f"{lm.name}: the query used a chat template, but this tokenizer has none")
    query_ids = {s.id for s in samples}
    prompts = {s.id: render_query(s, fmt, query_shots(settings.dataset, settings.split, s, settings.shots, query_ids, data_root), tok)
               for s in samples}
    groups = [s.group for s in samples] if kind == "mcq" else [""] * len(samples)
    # Encoded subject by subject while the run starts: the first subject is scored while later ones encode.
    seqs = TokenStream(tok, [prompts[s.id] for s in samples], settings.chat, groups)

    embedder, embedder_fp, embedder_path = None, None, None
    if kind == "open":
        embedder_path = resolve_embedder_name(settings.embedder)
        embedder, embedder_fp = load_embedder(embedder_path, lm.device)
    rec_path = state_records(out_dir, name)
    mpath = meta_path(rec_path)
    npy, side = reps_paths(rec_path)
    hidden = int(lm.model.get_input_embeddings().embedding_dim)
    run_key = {"stage": "state", "settings": asdict(settings), "prompt": {**fmt.describe(), "shot_layout": shot_layout(fmt)},
               "embedder_fingerprint": embedder_fp, **({"letter_rule": letter_rule(fmt)} if kind == "mcq" else {})}
    cer_def = ("sum_o p(o) log p(o) (negative entropy of the renormalised letter probabilities)"
               if settings.mcq_cer == "entropy" else "sum_o p(o)^2 (pairwise agreement, closed form)") if kind == "mcq" \
        else "1/(N(N-1)) sum_{j!=k} cos(E(a_j), E(a_k)) over N sampled answers"
    cor_def = "p(gold letter), renormalised over the letters" if kind == "mcq" else \
        "fraction of N sampled answers containing a gold answer (refusals never correct)"
    rep_info = {**REPRESENTATION, "file": npy.name, "dtype": settings.rep_dtype, "shape": [len(samples), hidden]}
    meta = make_meta("state", run_key, lm, samples, {"cor_definition": cor_def, "cer_definition": cer_def,
                                                      "representation": rep_info, "embedder": embedder_path,
                                                      **(extra_meta or {}),
                                                      "question_ids": [s.id for s in samples]})
    lock_output(rank_path(rec_path))  # one run per state file (rank r > 0: its shard)
    check_resumable(mpath, meta, restart)
    fresh = restart or not mpath.exists() or not npy.exists() or not side.exists()
    if not fresh:
        arr = load_npy(npy)
        fresh = arr.shape != (len(samples), hidden) or str(arr.dtype) != settings.rep_dtype
    dist.barrier()  # every rank has decided `fresh` from the same files before rank 0 changes them
    if dist.is_main:
        if fresh:  # records without their meta or representations cannot be trusted to match
            rec_path.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(mpath, meta)
        write_json(side, {**rep_info, "ids": [s.id for s in samples], "model_fingerprint": lm.fingerprint})
        if fresh:
            blank = open_memmap(npy, mode="w+", dtype=settings.rep_dtype, shape=(len(samples), hidden))
            blank[:] = np.nan  # a row still NaN at the end was never computed
            blank.flush()
            del blank
    dist.barrier()
    reps = open_memmap(npy, mode="r+")  # ranks write disjoint rows of the one file (same host)

    budget = token_budget(lm, max_batch_tokens, generation=kind == "open")
    # Open answers: N sequences of up to max_new_tokens more per question are held at once.
    # MCQ on a GPU: passes cut by the scorer's own cost model (as the probe and bench_mcq.py cut them); the CPU
    # keeps the budget-derived default its recorded results were planned with.
    overhead = pass_overhead_tokens(lm.model) if kind == "mcq" and str(lm.device).startswith("cuda") else None
    batches = iter_batches(seqs, groups, settings.batch_size, budget, share_prefix=kind == "mcq",
                           copies=max(settings.n_samples, 1), extra_tokens=settings.max_new_tokens,
                           overhead_tokens=overhead)
    scorer = PrefixScorer(lm.model, tok.pad_token_id)
    cands = letter_candidates(tok, max(len(s.choices) for s in samples), letter_rule(fmt)) if kind == "mcq" else []
    flat = [t for c in cands for t in c]

    def work(b: Batch, scored: Any) -> list[dict[str, Any]]:
        batch = [samples[i] for i in b.indices]
        bseqs = [seqs[i] for i in b.indices]
        if kind == "mcq":
            recs, hid = _mcq_records(batch, *scored, cands, settings.mcq_cer)
        else:
            recs, hid = _open_batch(lm, scorer, embedder, batch, bseqs, settings, batch_seed(settings.seed, b))
        rows = hid.numpy().astype(settings.rep_dtype)
        if not np.isfinite(rows).all():
            raise KbError(f"representations overflow {settings.rep_dtype}; rerun with --rep-dtype float32 --restart")
        reps[list(b.indices)] = rows
        reps.flush()  # representations first: a record on disk always has its row
        return recs

    def ahead(todo: Iterable[Batch]) -> Iterator[Any]:  # MCQ: the next pass is queued before this one is written
        return scorer.score_many((([seqs[i] for i in b.indices], b.prefix_len) for b in todo), flat, want_hidden=True)

    done = run_batches(rec_path, [s.id for s in samples], seqs, batches, work, desc=f"state {stem_of(rec_path)}", dist=dist,
                       restart=fresh, ahead=ahead if kind == "mcq" else None)  # rows are flushed before their records
    if done is None:
        return None  # not rank 0: rank 0 validates and summarises the merged file
    state = load_state(rec_path)
    load_reps(state)  # every row computed and finite
    wall = time.perf_counter() - t0
    summary = summarise(state, lm, fmt, wall)
    sum_path = write_json(state_summary(res_dir, name), {**summary, "meta": {k: v for k, v in meta.items() if k != "question_ids"}})
    print(summary["line"])
    if summary.get("note"):
        print("  note:", summary["note"])
    wrote(rec_path, mpath, npy, side)
    wrote(sum_path)
    return StateRun(state, summary, wall)


def _mcq_records(batch: list[Sample], logp: Any, hid: Any, cands: list[list[int]],
                 mcq_cer: str) -> tuple[list[dict[str, Any]], Any]:
    probs = letter_probs(logp, cands, [len(s.choices) for s in batch])
    out = []
    for s, p in zip(batch, probs):
        ent, agr = neg_entropy(p), agreement(p)
        out.append({"id": s.id, "kind": "mcq", "group": s.group, "question": s.question, "gold": s.answer,
                    "cor": p[LETTERS.index(s.answer)], "cer": ent if mcq_cer == "entropy" else agr,
                    "choices": list(s.choices), "letter_probs": p, "pred": LETTERS[int(np.argmax(p))],
                    "cer_entropy": ent, "cer_agree": agr})
    return out, hid


def _open_batch(lm: LoadedModel, scorer: PrefixScorer, embedder: Any, batch: list[Sample], seqs: list[list[int]],
                settings: QuerySettings, seed: int) -> tuple[list[dict[str, Any]], Any]:
    _, hid = scorer.score(seqs, 0, [0], want_hidden=True)
    n = settings.n_samples
    texts = sample_answers(lm.model, lm.tokenizer, seqs, n, settings.max_new_tokens, settings.temperature, seed,
                           keys=[question_key(settings.seed, s.id) for s in batch])
    answers = [[cut_at_period(t) for t in row] for row in texts]
    emb = embedder.encode([a for row in answers for a in row], batch_size=64, convert_to_numpy=True,
                          show_progress_bar=False)
    emb = np.asarray(emb, dtype=np.float64).reshape(len(batch), n, -1)
    out = []
    for k, s in enumerate(batch):
        ok = [open_correct(a, s.gold_answers) for a in answers[k]]
        out.append({"id": s.id, "kind": "open", "group": s.group, "question": s.question, "gold": s.answer,
                    "cor": sum(ok) / n, "cer": mean_pairwise_cosine(emb[k]), "aliases": list(s.aliases),
                    "samples": answers[k], "samples_correct": ok})
    return out, hid


def summarise(state: StateFile, lm: LoadedModel, fmt: PromptFormat, wall_s: float) -> dict[str, Any]:
    """Headline numbers of a state file, including how many questions qualify for rehearsal."""
    recs = state.records
    n = len(recs)
    cor = np.array([r["cor"] for r in recs])
    cer = np.array([r["cer"] for r in recs])
    name = stem_of(state.path)
    out: dict[str, Any] = {"name": name, "model": lm.label, "n": n, "kind": state.kind, "prompt": fmt.describe(),
                           "mean_cor": round(float(cor.mean()), 6), "mean_cer": round(float(cer.mean()), 6),
                           "n_known_mu_ge_0.5": int((cor >= 0.5).sum()),
                           "cor_quantiles": {q: round(float(np.quantile(cor, float(q))), 6)
                                             for q in ("0.1", "0.5", "0.9", "1.0")},
                           "wall_s_this_run": round(wall_s, 1)}
    label = f"{lm.label} {name} ({'chat' if fmt.chat else 'raw'} prompt, {fmt.shots}-shot)"
    if state.kind == "mcq":
        acc = float(np.mean([r["pred"] == r["gold"] for r in recs]))
        out["accuracy"] = round(acc, 6)
        out["mean_cer_agree"] = round(float(np.mean([r["cer_agree"] for r in recs])), 6)
        out["n_rehearsable"] = int((cor > 0.99).sum())
        out["pred_share"] = {k: round(float(np.mean([r["pred"] == k for r in recs])), 4) for k in "ABCD"}
        chance, note = near_chance(acc, recs)
        out["chance"] = round(chance, 4)
        if note:
            out["note"] = f"{note} (so this state's Cor/Cer split says little about knowledge)"
        out["line"] = (f"{label}: accuracy {acc:.1%}, mean Cor {cor.mean():.3f}, mean Cer {cer.mean():.3f} on {n} "
                       f"questions; {out['n_rehearsable']} with p(gold) > 0.99")
    else:
        out["n_rehearsable"] = int(((cor >= 0.995) & (cer >= 0.995)).sum())
        out["any_correct"] = round(float((cor > 0).mean()), 6)
        out["empty_sample_share"] = round(float(np.mean([a == "" for r in recs for a in r["samples"]])), 6)
        out["line"] = (f"{label}: mean Cor {cor.mean():.3f}, mean Cer {cer.mean():.3f} on {n} questions; "
                       f"{out['any_correct']:.0%} answered correctly at least once; {out['n_rehearsable']} with "
                       "Cor and Cer >= 0.995")
    return out
