"""kb.engine.Decoder on CPU with a tiny model: greedy = one-at-a-time generate, samples = a reference sampler."""

from __future__ import annotations

import pytest
import torch

from kb.engine import Decoder, StopRule, pick, row_key
from kb.testing import in_triton_interpreter, tiny_model, tiny_tokenizer

HERE = "tests/test_decode.py"
PROMPTS = ["Question: What is the capital of France? Answer:", "I am sure.", "A. B. C. D. Answer: A",
           "There is a single choice question about history.", "Are you sure you accurately answered",
           "I don't know.", "The following are multiple choice questions (with answers) about science."]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=3)
    seqs = [tok(p)["input_ids"] for p in PROMPTS]
    return tok, model, seqs


@torch.inference_mode()
def _greedy_one(model, seq, max_new, stops):
    out = model.generate(input_ids=torch.tensor([seq]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                         pad_token_id=0, temperature=None, top_k=None, top_p=None)
    new = out[0, len(seq):].tolist()
    for i, t in enumerate(new):
        if t in stops:
            return new[:i]
    return new


@torch.inference_mode()
def _reference_sample(model, seq, max_new, key, temperature, stops, rule=None, tok=None):
    """Full forward of prompt + tokens so far at every step, the same counter-based noise."""
    from kb.answers import answer_ended

    ids = list(seq)
    new: list[int] = []
    for t in range(max_new):
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
        nxt, _ = pick(logits, torch.tensor([key]), torch.tensor([t]), temperature, False)
        x = int(nxt[0])
        if x in stops:
            break
        new.append(x)
        ids.append(x)
        if rule and answer_ended(tok.decode(new, skip_special_tokens=True)):
            break
    return new


@pytest.mark.parametrize("kernel", [False, True], ids=["eager_pick", "pick_kernel"])
def test_greedy_matches_generate_with_refill(setup, kernel):
    """Greedy tokens and their log-probs as one-at-a-time generate gives them; with kb.engine.noise's
    Triton sampler too (run by Triton's interpreter on CPU where Triton is installed)."""
    if kernel and not in_triton_interpreter(f"{HERE}::test_greedy_matches_generate_with_refill[pick_kernel]"):
        return
    tok, model, seqs = setup
    ref_free = [_greedy_one(model, s, 12, [2]) for s in seqs]
    # A stop token that greedy decoding reaches mid-way in some replies: early stops and slot refills.
    stop = next(r[3] for r in ref_free if len(r) > 3)
    stops = [2, stop]
    ref = [_greedy_one(model, s, 12, stops) for s in seqs]
    assert any(len(r) < 12 for r in ref) and any(len(r) == 12 for r in ref)
    dec = Decoder(model, 0, stops, slots=2, sampler_kernel=kernel)
    out = dec.run(seqs, 12, want_logps=True)
    assert dec.stats["sampler"] == ("kernel" if kernel else "eager")
    assert [o[0].tokens for o in out] == ref
    assert dec.stats["admissions"] > 1
    # log-probs are those of the greedy tokens
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([seqs[0] + ref[0]])).logits[0].float(), -1)
    want = [float(lp[len(seqs[0]) - 1 + i, t]) for i, t in enumerate(ref[0])]
    assert out[0][0].logps == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kernel", [False, True], ids=["eager_pick", "pick_kernel"])
def test_samples_match_reference_sampler_and_ignore_batch_composition(setup, kernel):
    if kernel and not in_triton_interpreter(
            f"{HERE}::test_samples_match_reference_sampler_and_ignore_batch_composition[pick_kernel]"):
        return
    tok, model, seqs = setup
    keys = [1000 + 7 * q for q in range(len(seqs))]
    n, mx = 3, 10
    dec = Decoder(model, 0, [2], slots=3, sampler_kernel=kernel)
    out = dec.run(seqs, mx, n=n, temperature=0.8, keys=keys)
    for q, s in enumerate(seqs):
        for k in range(n):
            assert out[q][k].tokens == _reference_sample(model, s, mx, row_key(keys[q], k), 0.8, [2]), (q, k)
    assert len({tuple(o.tokens) for o in out[0]}) > 1  # the N samples differ
    # Another batch composition, another slot count: the same samples per question.
    order = [5, 2, 0]
    again = Decoder(model, 0, [2], slots=1, sampler_kernel=kernel).run([seqs[i] for i in order], mx, n=n, temperature=0.8,
                                               keys=[keys[i] for i in order])
    assert [[r.tokens for r in again[j]] for j in range(3)] == [[r.tokens for r in out[i]] for i in order]


def test_pick_kernel_draws_as_pick():
    """kb.engine.noise's Triton sampler against `pick`: the same tokens (sampled and greedy, a vocabulary over
    several chunks, the first of tied maxima across chunks) and log-probs."""
    if not in_triton_interpreter(f"{HERE}::test_pick_kernel_draws_as_pick"):
        return
    from kb.engine.noise import pick_kernel

    g = torch.Generator().manual_seed(0)
    vocab = 4097  # three chunks of 2,048, the last one a single token
    logits = (torch.randn(24, vocab, generator=g) * 3).to(torch.bfloat16)
    logits[0, [100, 3000]] = 30.0  # a tie in two chunks: the first wins, as torch's argmax
    logits[1, [4096, 5]] = 30.0
    keys = torch.tensor([row_key(77 + r, r % 3) for r in range(24)])
    t = torch.arange(24) % 7 + 1
    for temperature in (None, 0.8, 1.0):
        want, want_lp = pick(logits, keys, t, temperature, True)
        got, got_lp = pick_kernel(logits, keys, t, temperature, True)
        assert got.tolist() == want.tolist(), temperature
        assert got_lp.tolist() == pytest.approx(want_lp.tolist(), abs=1e-5)
        assert pick_kernel(logits, keys, t, temperature, False)[1] is None
    assert pick_kernel(logits, keys, t, None, False)[0][:2].tolist() == [100, 5]
    sampled = {tuple(pick_kernel(logits, keys, t + s, 1.0, False)[0].tolist()) for s in range(3)}
    assert len(sampled) == 3  # the step index moves the noise


def test_pick_kernel_is_checked_before_use(monkeypatch):
    """The decoder's default sampler: the kernel where it builds and draws as `pick`, else `pick` compiled."""
    if not in_triton_interpreter(f"{HERE}::test_pick_kernel_is_checked_before_use"):
        return
    import kb.engine.noise as noise

    cpu = torch.device("cpu")
    assert noise.pick_kernel_problem(cpu, 300) is None and noise.pick_kernel_problem(cpu, 300, torch.bfloat16) is None
    monkeypatch.setattr(noise, "_KERNEL_PROBLEM", {})
    monkeypatch.setattr(noise, "pick_kernel", lambda logits, *a: (logits.float().argmin(-1), torch.zeros(len(logits))))
    assert "differ" in noise.pick_kernel_problem(cpu, 300)
    monkeypatch.setattr(noise, "_KERNEL_PROBLEM", {})
    monkeypatch.setattr(noise, "pick_kernel", lambda *a: 1 / 0)
    assert noise.pick_kernel_problem(cpu, 300) == "division by zero"


def test_answer_end_rule_on_device(setup):
    tok, model, seqs = setup
    rule = StopRule.answer_end(tok, model.get_output_embeddings().weight.shape[0])
    keys = list(range(len(seqs)))
    out = Decoder(model, 0, [2], slots=2).run(seqs, 16, n=4, temperature=1.0, keys=keys, stop_rule=rule)
    stopped = 0
    for q, s in enumerate(seqs):
        for k in range(4):
            ref = _reference_sample(model, s, 16, row_key(keys[q], k), 1.0, [2], rule=True, tok=tok)
            assert out[q][k].tokens == ref, (q, k)
            stopped += len(ref) < 16
    assert stopped > 0


def _varlen_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale, seqused_k):
    """flash attention's varlen forward as documented: sequence i's queries q[cu_q[i]:cu_q[i+1]] attend to
    seqused_k[i] keys from k[cu_k[i]], heads grouped; returns (out, lse [H, total_q], ...)."""
    assert dropout == 0.0 and not causal and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
    assert cu_q.dtype == cu_k.dtype == seqused_k.dtype == torch.int32 and int(seqused_k.max()) <= max_k
    h, hkv = q.shape[1], k.shape[1]
    out, lse = torch.zeros_like(q), torch.zeros(h, q.shape[0])
    for i in range(len(cu_q) - 1):
        a, b, c = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i])
        ks, vs = (x[c:c + int(seqused_k[i])].float().repeat_interleave(h // hkv, dim=1) for x in (k, v))
        s = torch.einsum("mhd,nhd->hmn", q[a:b].float(), ks) * scale
        out[a:b] = torch.einsum("hmn,nhd->mhd", torch.softmax(s, -1), vs).to(q.dtype)
        lse[:, a:b] = torch.logsumexp(s, -1)
    _varlen_flash.calls += 1
    return out, lse, None, None, None


@pytest.mark.parametrize("own_kernel", [False, True], ids=["flash_own_half", "triton_own_half"])
def test_flash_path_reads_the_used_keys_only(setup, monkeypatch, own_kernel):
    """The flash path's bookkeeping (varlen offsets, used lengths, the buffers' layout, the halves' merge)
    against the plain path, with the kernel replaced by its documented semantics (no CUDA here); and the
    own-half Triton kernel, run by Triton's interpreter on CPU where Triton is installed."""
    import kb.engine.graph as graph

    if own_kernel:
        if not in_triton_interpreter("tests/test_decode.py::test_flash_path_reads_the_used_keys_only[triton_own_half]"):
            return
        monkeypatch.setattr(graph, "triton_available", lambda *a: True)
    tok, model, seqs = setup
    monkeypatch.setattr(graph, "model_flash_supported", lambda *a: True)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", _varlen_flash, raising=False)
    _varlen_flash.calls = 0
    keys = [50 + q for q in range(len(seqs))]
    plain = Decoder(model, 0, [2], slots=2).run(seqs, 10, n=3, temperature=0.9, keys=keys)
    flash = Decoder(model, 0, [2], slots=2, fused=True, own_kernel=own_kernel)
    assert flash.flash and flash.own_kernel == own_kernel
    out = flash.run(seqs, 10, n=3, temperature=0.9, keys=keys)
    assert flash.stats["flash_attention"] and flash.stats["admissions"] > 1 and _varlen_flash.calls > 0
    assert flash.stats["own_kernel"] == own_kernel
    assert [[r.tokens for r in o] for o in out] == [[r.tokens for r in o] for o in plain]
    greedy = Decoder(model, 0, [2], slots=3, fused=True, own_kernel=own_kernel).run(seqs, 12)
    assert [o[0].tokens for o in greedy] == [_greedy_one(model, s, 12, [2]) for s in seqs]


def test_stage_sampling_through_the_decoder_is_keyed_by_question(setup, monkeypatch):
    """kb.engine.sample_answers on the decoder path (forced on CPU): a question's samples do not depend on its batch,
    and the on-device answer-end stop leaves the cut answers as the full-length samples give them."""
    import kb.engine.generation as gen
    from kb.answers import cut_at_period

    tok, model, seqs = setup
    monkeypatch.setattr(gen, "use_decoder", lambda m: True)
    keys = [11, 22, 33, 44]
    both = gen.sample_answers(model, tok, seqs[:4], 3, 12, 1.0, seed=0, keys=keys)
    alone = gen.sample_answers(model, tok, seqs[2:3], 3, 12, 1.0, seed=5, keys=keys[2:3])
    assert alone[0] == both[2]
    full = gen.sample_answers(model, tok, seqs[:4], 3, 12, 1.0, seed=0, keys=keys, stop_at_answer_end=False)
    assert [[cut_at_period(t) for t in r] for r in both] == [[cut_at_period(t) for t in r] for r in full]


def test_evaluation_replies_through_the_decoder_match_the_cpu_path(tiny_lm):
    """GreedyDecoder's GPU path (the device decoder, forced here on CPU): same replies, first-step letter
    probabilities and p(sure) (then from PrefixScorer's pass) as its CPU path, records compared whole."""
    from kb.data import load_split, subset
    from kb.engine import GreedyDecoder, PrefixScorer, encode, generation_stop_ids, letter_candidates, plan_batches
    from kb.evaluate import _batch_records
    from kb.prompts import PromptFormat, render

    tok = tiny_lm.tokenizer
    samples = subset(load_split("mmlu", "ID_test"), 6, 3)
    chat = bool(getattr(tok, "chat_template", None))
    prompts = [render(s, PromptFormat("mcq_refuse", 0, chat), [], tok) for s in samples]
    seqs = encode(tok, prompts, chat)
    batch = plan_batches(seqs, [""] * len(seqs), 16, 1 << 16, extra_tokens=6)[0]
    idx = list(batch.indices)
    cands = letter_candidates(tok)
    sure_ids = [tok.encode(w, add_special_tokens=False) for w in (" sure", " unsure")]
    scorer = PrefixScorer(tiny_lm.model, tok.pad_token_id)
    recs = []
    for fast in (False, True):
        dec = GreedyDecoder(tiny_lm.model, tok.pad_token_id, set(generation_stop_ids(tiny_lm.model, tok)))
        dec.fast = fast
        recs.append(_batch_records(tiny_lm, dec, scorer, [samples[i] for i in idx], [prompts[i] for i in idx],
                                   [seqs[i] for i in idx], batch.prefix_len, cands, sure_ids, 6, 32, chat, True))
    for a, b in zip(*recs):
        assert a["reply"] == b["reply"] and a["pred"] == b["pred"]
        assert a["letter_probs"] == pytest.approx(b["letter_probs"], abs=1e-5)
        assert a["sure_prob"] == pytest.approx(b["sure_prob"], abs=1e-4)


def test_sampler_falls_back_to_compiled_pick(setup, monkeypatch):
    """Where the kernel fails its check the decoder says so once and compiles `pick` (greedy steps stay eager)."""
    import kb.engine.graph as graph
    from kb.engine.noise import CompiledPick

    tok, model, seqs = setup
    monkeypatch.setattr(graph, "triton_runs", lambda device: True)
    monkeypatch.setattr(graph, "pick_kernel_problem", lambda device, vocab, dtype: "it broke")
    with pytest.warns(UserWarning, match="sampler kernel is not used \\(it broke\\)"):
        dec = Decoder(model, 0, [2], slots=2)
    assert isinstance(dec._pick, CompiledPick)
    out = dec.run(seqs, 8, want_logps=True)
    assert [o[0].tokens for o in out] == [o[0].tokens for o in Decoder(model, 0, [2], slots=2).run(seqs, 8)]
    assert dec.stats["sampler"] == "compiled"
