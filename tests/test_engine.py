"""The probing engine: every fast path equals the one-at-a-time forward; plans respect budgets; ranks merge.

Tiny random models (Llama, Gemma, Gemma 3 with a sliding window shorter than the prompt), float32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kb.engine import (
    BATCH_OVERHEAD_TOKENS,
    PrefixScorer,
    cascade_supported,
    common_prefix_len,
    decoder_stack,
    generate,
    letter_probs,
    plan_batches,
)
from kb.testing import tiny_model, tiny_tokenizer, torchrun


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine, many threads spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def gemma3_sliding(vocab_size: int):
    """Gemma 3 text model whose sliding window (16) is shorter than the shared prefix (40 tokens)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts(vocab: int, n: int = 11, prefix: int = 40, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, vocab, (prefix,), generator=g).tolist()
    lens = torch.randint(1, 25, (n,), generator=g).tolist()
    return [head + torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


@torch.inference_mode()
def one_at_a_time(model, seqs):
    """The obvious path: each full prompt alone, no padding, no cache."""
    logps, hids = [], []
    for s in seqs:
        x = torch.tensor([s])
        logps.append(torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1))
        hids.append(decoder_stack(model)(input_ids=x).last_hidden_state[0, -1].float())
    return torch.stack(logps), torch.stack(hids)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma3"])
def test_prefix_reuse_bucketing_and_padding_match_one_at_a_time(tok, arch):
    model = gemma3_sliding(len(tok)) if arch == "gemma3" else tiny_model(arch, vocab_size=len(tok))
    seqs = prompts(len(tok))
    ref_logp, ref_hid = one_at_a_time(model, seqs)
    p = common_prefix_len(seqs)
    assert p >= 40
    modes = ["cascade", "view", "copy"] if cascade_supported(model) else ["view", "copy"]
    assert (arch == "gemma3") == ("cascade" not in modes)  # sliding windows take the KV-view path
    batches = plan_batches(seqs, ["g"] * len(seqs), batch_size=4, max_batch_tokens=10_000)
    assert len(batches) >= 3 and all(b.prefix_len == p for b in batches)
    cands = [5, 6, 7, 8]
    for mode in modes:
        scorer = PrefixScorer(model, tok.pad_token_id, mode=mode)
        jobs = [([seqs[i] for i in b.indices], b.prefix_len) for b in batches]
        got = torch.zeros(len(seqs), len(cands))
        for b, (logp, _) in zip(batches, scorer.score_many(jobs, cands)):
            got[list(b.indices)] = logp
        assert torch.allclose(got, ref_logp[:, cands], atol=1e-5), mode
        for prefix_len in (p, 0):  # the shared cache, and plain padding without one
            logp, hid = scorer.score(seqs, prefix_len, want_hidden=True)
            assert torch.allclose(logp, ref_logp, atol=1e-5), (mode, prefix_len)
            assert torch.allclose(hid, ref_hid, atol=1e-4), (mode, prefix_len)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """What varlen flash attention computes, sequence by sequence in fp32 (grouped heads expanded)."""
    rep = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1).float()
        ks, vs = (x[cu_k[i]:cu_k[i + 1]].repeat_interleave(rep, 1).transpose(0, 1).float() for x in (k, v))
        assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
        s = qs @ ks.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        lses.append(torch.logsumexp(s, -1))
        outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def test_varlen_cascade_offsets_and_grouped_heads_match_one_at_a_time(tok, monkeypatch):
    """The CUDA varlen path's plumbing (packed offsets, the prefix's [P, Hkv, D] layout, the merge) on CPU,
    with flash attention replaced by its definition; the kernel itself is checked by bench_mcq on a GPU."""
    from kb.engine import attention
    from kb.engine import scorer as scorer_mod

    monkeypatch.setattr(attention, "varlen_flash", reference_varlen)
    monkeypatch.setattr(scorer_mod, "model_flash_supported", lambda *a: True)
    model = tiny_model("llama", vocab_size=len(tok))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    seqs = prompts(len(tok), seed=3)
    ref_logp, ref_hid = one_at_a_time(model, seqs)
    scorer = PrefixScorer(model, tok.pad_token_id, mode="cascade", varlen=True)
    assert scorer.varlen
    p = common_prefix_len(seqs)
    # A group's first batch runs its prefix in the same pass (no prefix pass); later batches read the stored
    # keys/values; a new prefix replaces them; and no prefix at all.
    for part, prefix_len in ((slice(0, 4), p), (slice(4, None), p), (slice(None), p - 3), (slice(None), 0)):
        logp, hid = scorer.score(seqs[part], prefix_len, want_hidden=True)
        assert torch.allclose(logp, ref_logp[part], atol=1e-5), (part, prefix_len)
        assert torch.allclose(hid, ref_hid[part], atol=1e-4), (part, prefix_len)
        assert prefix_len == 0 or len(scorer._prefix_kv) == model.config.num_hidden_layers
        assert prefix_len == 0 or scorer._prefix_kv[0][0].shape[0] == prefix_len
    monkeypatch.undo()
    with pytest.raises(ValueError, match="flash attention"):
        PrefixScorer(model, tok.pad_token_id, mode="cascade", varlen=True)  # CPU: no flash attention
    assert not PrefixScorer(model, tok.pad_token_id, mode="cascade").varlen


def test_token_stream_encodes_group_by_group_and_hands_errors_to_the_reader(tok):
    """TokenStream gives encode's ids, groups in order of first appearance; a failing group raises when read."""
    from kb.engine import TokenStream, encode, iter_batches

    texts = [f"question {i} " * (1 + i % 5) for i in range(12)]
    groups = ["b", "a", "b", "c", "a", "b", "c", "c", "a", "b", "a", "c"]
    stream = TokenStream(tok, texts, False, groups)
    assert list(stream.wait()) == encode(tok, texts, False) and len(stream) == 12 and stream.seconds > 0
    lazy = list(iter_batches(stream, groups, 2, 10_000))
    assert lazy == plan_batches(encode(tok, texts, False), groups, 2, 10_000)
    assert [b.group for b in lazy] == sorted([b.group for b in lazy], key="bac".index)  # first-appearance order

    class Failing:  # encodes group "b", then fails on "a"
        def __init__(self):
            self.calls = 0

        def __call__(self, prompts, add_special_tokens=True):
            self.calls += 1
            if self.calls == 2:
                raise ValueError("bad text")
            return {"input_ids": [[1, 2]] * len(prompts)}

    bad = TokenStream(Failing(), texts, False, groups)
    assert bad[0] == [1, 2]  # group "b" was encoded
    with pytest.raises(ValueError, match="bad text"):
        bad[1]  # group "a"
    with pytest.raises(ValueError, match="bad text"):
        bad.wait()


def test_letter_probs_sum_variants_and_renormalise():
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.05, 0.05, 0.3, 0.1], [0.25, 0.25, 0.1, 0.1, 0.2, 0.1]]))
    cands = [[0, 1], [2], [3], [4, 5]]  # 'A' and ' A', ...
    p = letter_probs(logp, cands, [4, 3])
    assert p[0] == pytest.approx([0.3 / 0.8, 0.05 / 0.8, 0.05 / 0.8, 0.4 / 0.8])
    assert p[1] == pytest.approx([0.5 / 0.7, 0.1 / 0.7, 0.1 / 0.7]) and len(p[1]) == 3


def test_plan_batches_respects_budgets_and_covers_every_question_once():
    rng = np.random.default_rng(0)
    groups = [f"s{g}" for g in rng.integers(0, 5, 300)]
    head = {g: list(range(100, 100 + int(rng.integers(20, 60)))) for g in set(groups)}
    seqs = [head[g] + rng.integers(1000, 2000, int(rng.integers(1, 200))).tolist() for g in groups]
    for batch_size, budget, copies, extra in [(16, 4000, 1, 0), (64, 20_000, 1, 0), (8, 3000, 5, 15), (4, 10, 1, 0)]:
        batches = plan_batches(seqs, groups, batch_size, budget, copies=copies, extra_tokens=extra)
        seen = sorted(i for b in batches for i in b.indices)
        assert seen == list(range(len(seqs)))
        for b in batches:
            lens = [len(seqs[i]) for i in b.indices]
            assert lens == sorted(lens, reverse=True)  # longest first: the first row is the width
            assert len(b.indices) <= batch_size
            assert len(b.indices) == 1 or len(b.indices) * copies * (lens[0] + extra) <= budget
            assert {groups[i] for i in b.indices} == {b.group}
            assert b.prefix_len == common_prefix_len([seqs[i] for i in range(len(seqs)) if groups[i] == b.group])
        assert batches == plan_batches(seqs, groups, batch_size, budget, copies=copies, extra_tokens=extra)
    # The cut points beat greedy filling on padded tokens + per-pass overhead.
    batches = plan_batches(seqs, groups, 64, 20_000, overhead_tokens=BATCH_OVERHEAD_TOKENS)

    def cost(bs):
        return sum(len(b.indices) * (len(seqs[b.indices[0]]) - b.prefix_len) + BATCH_OVERHEAD_TOKENS for b in bs)

    greedy = []
    for g in dict.fromkeys(groups):
        idx = sorted((i for i in range(len(seqs)) if groups[i] == g), key=lambda i: (-len(seqs[i]), i))
        p = batches[[b.group for b in batches].index(g)].prefix_len
        while idx:
            k = max(1, min(64, 20_000 // len(seqs[idx[0]])))
            greedy.append(type(batches[0])(tuple(idx[:k]), g, p))
            idx = idx[k:]
    assert cost(batches) <= cost(greedy)


def test_generation_shares_the_prefill_across_samples(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    seqs = [s[35:] for s in prompts(len(tok), n=4)]
    shared, _ = generate(model, tok, seqs, 6, do_sample=True, num_return_sequences=3, seed=7)
    cls = type(model)
    module = cls.__module__
    cls.__module__ = "not_transformers"  # forces the plain num_return_sequences path
    try:
        plain, _ = generate(model, tok, seqs, 6, do_sample=True, num_return_sequences=3, seed=7)
    finally:
        cls.__module__ = module
    assert shared == plain and len(shared) == 4 and all(len(r) == 3 for r in shared)
    greedy, scores = generate(model, tok, seqs, 6, want_scores=True)
    assert greedy == [generate(model, tok, [s], 6)[0][0] for s in seqs]
    assert all(len(s) == 1 for s in scores)


@pytest.mark.slow  # two torchrun processes
def test_two_ranks_merge_into_the_single_process_file(tmp_path, tiny_model_dir):
    """torchrun with 2 CPU processes (gloo): merged records and training data equal a single run's, byte for byte."""
    from run_MMLU import main

    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--limit", "24", "--shots", "5", "--batch-size", "3",
            "--method", "uncertain", "--results-dir", str(tmp_path / "res")]
    main([*args, "--output-dir", str(tmp_path / "one")])
    proc = torchrun("run_MMLU.py", [*args, "--output-dir", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "tiny-llama", tmp_path / "two" / "tiny-llama"
    names = sorted(p.name for p in one.iterdir() if not p.name.endswith(".meta.json"))
    assert sorted(p.name for p in two.iterdir() if not p.name.endswith(".meta.json")) == names  # no shards left
    assert any(n.startswith("probe_") and n.endswith(".jsonl") for n in names)
    for n in names:
        if n.endswith(".jsonl"):
            assert (two / n).read_bytes() == (one / n).read_bytes(), n
        else:  # training data embed the run's meta (output dir in args); the instances must be identical
            import json

            a, b = json.loads((one / n).read_text()), json.loads((two / n).read_text())
            assert a["instances"] == b["instances"], n


def test_generation_token_bytes_count_the_vocabulary_and_the_dtype():
    """A Gemma-3-270M-shaped model: its 262k-entry fp32 logits dominate a generated token's memory, and fp32
    weights double the keys and values (the state query that ran out of memory counted neither)."""
    from types import SimpleNamespace

    from kb.engine.plan import token_bytes

    gemma = SimpleNamespace(num_hidden_layers=18, num_key_value_heads=1, num_attention_heads=4, head_dim=256,
                            hidden_size=640, intermediate_size=2048, vocab_size=262144)
    small_vocab = SimpleNamespace(**{**vars(gemma), "vocab_size": 32000})
    gen32, gen16 = token_bytes(gemma, 4, True), token_bytes(gemma, 2, True)
    assert gen32 >= 2 * 4 * 262144 and gen32 - gen16 == 18 * 2 * 1 * 256 * 2
    assert token_bytes(gemma, 4, True) - token_bytes(small_vocab, 4, True) == 2 * 4 * (262144 - 32000)
    assert token_bytes(gemma, 4, False) < gen32 / 10  # scoring keeps one layer and no vocabulary-wide rows
    # The device decoder holds logits per sequence (and sizes its own slots): only keys/values and activations.
    assert token_bytes(gemma, 4, True, decoder=True) == token_bytes(small_vocab, 4, True, decoder=True) \
        == gen32 - 2 * 4 * 262144
