"""kb.engine.fused: the fused RMSNorm, RoPE and SiLU·up kernels against transformers' eager layers.

The kernels run on CPU through Triton's interpreter, in a subprocess (kb.testing.in_triton_interpreter), in
fp32: the interpreter truncates when it casts to bf16 where a GPU rounds to nearest, so the bf16 roundings
the kernels repeat are checked on a GPU (bench/decode_check.py), not here.
"""

from __future__ import annotations

import sys

import pytest
import torch

from kb.engine import Decoder, PrefixScorer
from kb.engine.fused import Fusion, fused_layers, fused_supported
from kb.testing import in_triton_interpreter, tiny_model

HERE = "tests/test_fused.py"


@torch.no_grad()
def test_kernels_match_the_eager_ops():
    if not in_triton_interpreter(f"{HERE}::test_kernels_match_the_eager_ops"):
        return
    import transformers.models.llama.modeling_llama as llama

    from kb.engine.fused import rms_norm, rope, silu_mul
    from kb.engine.own_attention import lse_merge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 96, generator=g) * 3
    norm = llama.LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=g)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rms_norm(x[:, 2], norm.weight, 1e-5), norm(x[:, 2]), rtol=1e-6, atol=1e-6)  # strided rows
    gate, up = torch.randn(3, 1000, generator=g) * 4, torch.randn(3, 1000, generator=g)
    torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)
    # q and k as transformers makes them: [B, S, H, D] projections seen as [B, H, S, D]; cos/sin of batch 1.
    q = torch.randn(2, 5, 6, 32, generator=g).transpose(1, 2)
    k = torch.randn(2, 5, 3, 32, generator=g).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    ref_q, ref_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope(q, cos, sin), ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope(k, cos.expand(2, -1, -1), sin.expand(2, -1, -1)), ref_k, rtol=1e-6, atol=1e-6)
    assert rope(q, cos, sin).stride() == q.stride()  # the output keeps the input's layout
    # The cascade scorer's merge of two attention halves ([T, H, D], log-sum-exps [H, T]); 6 heads: a partial block.
    a, b = torch.randn(9, 6, 32, generator=g), torch.randn(9, 6, 32, generator=g)
    la, lb = torch.randn(6, 9, generator=g) * 4, torch.randn(6, 9, generator=g) * 4
    want = torch.lerp(a, b, torch.sigmoid(lb - la).transpose(0, 1)[..., None])
    torch.testing.assert_close(lse_merge(a, b, la, lb), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_merge(a, b, lb.T.contiguous().T, la), torch.lerp(a, b, torch.sigmoid(la - lb).T[..., None]),
                               rtol=1e-6, atol=1e-6)  # strided log-sum-exps
    a2 = a.clone()
    assert lse_merge(a2, b, la, lb, out=a2) is a2 and torch.allclose(a2, want, rtol=1e-6, atol=1e-6)  # in place


@torch.no_grad()
def test_fused_layers_compute_the_model_and_put_it_back():
    if not in_triton_interpreter(f"{HERE}::test_fused_layers_compute_the_model_and_put_it_back"):
        return
    import transformers.models.llama.modeling_llama as llama

    model = tiny_model(seed=1)
    rotary = llama.apply_rotary_pos_emb
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    with fused_layers(model):
        assert llama.apply_rotary_pos_emb is not rotary and "forward" in vars(model.model.norm)
        with fused_layers(model):  # nested: a no-op, and leaving it keeps the outer context's kernels in
            pass
        assert "forward" in vars(model.model.layers[0].mlp)
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert llama.apply_rotary_pos_emb is rotary
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


@torch.no_grad()
def test_scorer_and_decoder_through_the_fused_kernels():
    """The MCQ scorer's cascade pass and the decoder's prefill and steps, fused kernels on vs off."""
    if not in_triton_interpreter(f"{HERE}::test_scorer_and_decoder_through_the_fused_kernels"):
        return
    model = tiny_model(seed=2)
    seqs = torch.randint(3, 300, (6, 12), generator=torch.Generator().manual_seed(2)).tolist()
    plain = PrefixScorer(model, 0, fused_kernels=False).score(seqs, 5, want_hidden=True)
    scorer = PrefixScorer(model, 0, fused_kernels=True)
    fused = scorer.score(seqs, 5, want_hidden=True)
    assert scorer.fusion.on and scorer.fusion.proven
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    keys = list(range(6))
    ref = Decoder(model, 0, [2], slots=2, fused_kernels=False).run(seqs, 10, n=3, temperature=0.9, keys=keys)
    dec = Decoder(model, 0, [2], slots=2, fused_kernels=True)
    out = dec.run(seqs, 10, n=3, temperature=0.9, keys=keys)
    assert dec.stats["fused_layers"] and dec.stats["admissions"] > 1
    assert [[r.tokens for r in o] for o in out] == [[r.tokens for r in o] for o in ref]


def test_fused_supported_only_where_the_kernels_compute_the_model():
    llama, gemma = tiny_model(), tiny_model("gemma")
    assert not fused_supported(llama)  # CPU: transformers' layers
    assert not fused_supported(gemma, any_device=True)  # GELU MLP, (1 + w) norm: not this formula
    assert not Fusion(gemma, enabled=True).on  # asking for the kernels never applies them where they are wrong
    assert not Fusion(llama).on and not Fusion(llama, enabled=False).on
    with fused_layers(llama, enabled=False):
        assert all("forward" not in vars(m) for m in llama.modules())


def test_fused_layers_undo_a_partial_patch():
    """A model whose layers lack a piece fails inside fused_layers; what was patched before is undone."""
    import kb.engine.fused as fused

    model = tiny_model(layers=2)
    del model.model.layers[1].mlp
    with pytest.raises(AttributeError), fused_layers(model):
        pass
    assert all("forward" not in vars(m) for m in model.modules())
    assert id(model.model) not in fused._ACTIVE  # and the next fused_layers on it patches again


@torch.no_grad()
def test_fusion_falls_back_to_transformers_when_the_kernels_fail(monkeypatch):
    import kb.engine.fused as fused

    def broken() -> None:
        raise RuntimeError("no Triton backend for this machine")

    monkeypatch.setattr(fused, "_kernels", broken)
    monkeypatch.setattr(fused, "fused_supported", lambda m, **k: True)  # as on a GPU with Triton
    model = tiny_model(seed=3)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary = module.apply_rotary_pos_emb
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    fusion = Fusion(model, enabled=True)
    with pytest.warns(UserWarning, match="fused kernels failed"):
        out = fusion.run(model, ids).logits
    assert not fusion.on and torch.equal(out, ref)
    assert all("forward" not in vars(m) for m in model.modules())
    assert module.apply_rotary_pos_emb is rotary
    proven = Fusion(model, enabled=True)
    proven.proven = True  # a failure after a good pass is a real error, not a missing compiler
    with pytest.raises(RuntimeError, match="no Triton backend"):
        proven.run(model, ids)
