"""KB_GPU_SHARE: what a process sharing a GPU counts as free memory (no GPU needed: CUDA's counters are faked)."""

from __future__ import annotations

import pytest
import torch

from kb.engine import memory
from kb.errors import KbError

GIB = 1 << 30


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 100 GiB GPU with 60 GiB free; this process holds 10 GiB, 4 of them cached and reusable."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 100 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * GIB)
    monkeypatch.delenv(memory.SHARE_ENV, raising=False)


def test_without_a_share_free_memory_and_own_cache_count(fake_gpu):
    assert memory.usable_cuda_bytes() == 64 * GIB


def test_a_share_caps_what_the_process_may_still_take(fake_gpu, monkeypatch):
    monkeypatch.setenv(memory.SHARE_ENV, "0.2")  # 20 GiB of the GPU, 6 already allocated
    assert memory.usable_cuda_bytes() == 14 * GIB
    monkeypatch.setenv(memory.SHARE_ENV, "1")  # the whole GPU: free memory is the tighter bound
    assert memory.usable_cuda_bytes() == 64 * GIB
    monkeypatch.setenv(memory.SHARE_ENV, "0.05")  # already over its share: nothing more
    assert memory.usable_cuda_bytes() == 0


@pytest.mark.parametrize("raw", ["0", "1.5", "-0.1", "half"])
def test_a_bad_share_is_one_line_naming_the_variable(fake_gpu, monkeypatch, raw):
    monkeypatch.setenv(memory.SHARE_ENV, raw)
    with pytest.raises(KbError, match="KB_GPU_SHARE"):
        memory.usable_cuda_bytes()


def test_the_token_budget_follows_the_share(fake_gpu, monkeypatch):
    from kb.engine.plan import auto_token_budget

    class OnCuda(torch.nn.Module):  # the budget only asks the parameters' device and the config
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(0, device="meta"))
            self.config = type("C", (), {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                         "intermediate_size": 128, "vocab_size": 1000})()

        def parameters(self, recurse=True):
            yield type("P", (), {"device": torch.device("cuda"), "dtype": torch.float32})()

    whole = auto_token_budget(OnCuda(), generation=True)
    monkeypatch.setenv(memory.SHARE_ENV, "0.2")
    shared = auto_token_budget(OnCuda(), generation=True)
    assert shared == pytest.approx(whole * 14 / 64, rel=0.01)


def test_a_bad_share_stops_a_stage_when_it_loads_the_model(monkeypatch):
    from kb.models import load_model

    monkeypatch.setenv(memory.SHARE_ENV, "2")
    with pytest.raises(KbError, match="KB_GPU_SHARE='2'"):  # before the model (here: none such) is looked up
        load_model("no-such/model")
