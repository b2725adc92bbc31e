"""kb's Triton kernels build for NVIDIA GPUs (sm_80, sm_90) ahead of time, on CPU.

Why: the CPU tests of the kernels' math run them through Triton's interpreter, which executes a kernel as
NumPy and cannot see what only the compiler rejects (a loop-carried value that changes type, an unsigned
constant, a specialisation argument), and CI has no GPU. Triton's compiler builds PTX and runs ptxas without
one. Launch arguments as kb's wrappers pass them (bf16 activations, fp32 log-sum-exps, int64 token ids).
"""

from __future__ import annotations

from typing import Any

import pytest

from kb.testing import in_triton_compiler

HERE = "tests/test_kernel_builds.py"


def _build(fn: Any, pointers: dict[str, str], floats: set[str], constexprs: dict[str, int], arch: int,
           **options: int) -> Any:
    """Compile `fn` (a triton.jit function) for CUDA compute capability `arch`; pointers default to pointers["*"]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + pointers.get(p.name, pointers.get("*", "bf16"))
        else:
            sig[p.name] = "fp32" if p.name in floats else "i32"
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32), options=options)


def _kernels() -> dict[str, tuple[Any, dict[str, str], set[str], dict[str, int], dict[str, int]]]:
    from kb.engine import fused, noise, own_attention

    f = fused._kernels()
    launch = own_attention.OWN_HALF_LAUNCH
    return {
        "sampler": (noise._kernel(), {"x_ptr": "bf16", "keys_ptr": "i64", "t_ptr": "i64", "tok_ptr": "i64",
                                      "lp_ptr": "fp32"}, {"inv_t"}, {"BLOCK": noise._BLOCK}, {"num_warps": 8}),
        "rms_norm": (f["rms_norm"], {}, {"eps"}, {"BLOCK": 4096}, {"num_warps": 8}),
        "silu_mul": (f["silu_mul"], {}, set(), {"BLOCK": 1024}, {"num_warps": 4}),
        "rope": (f["rope"], {}, set(), {"HALF": 64, "BLOCK": 64, "HB": 8}, {"num_warps": 4}),
        "own_half": (own_attention._kernel(), {"plse_ptr": "fp32", "used_ptr": "i32"}, {"scale"},
                     {"D": 128, "BLOCK_T": int(launch["block_t"] or 64)},
                     {"num_warps": int(launch["num_warps"] or 4), "num_stages": int(launch["num_stages"] or 3)}),
        "lse_merge": (own_attention._merge_kernel(), {"la_ptr": "fp32", "lb_ptr": "fp32"}, set(), {"D": 128, "HB": 8},
                      {"num_warps": 4}),
    }


def test_every_kernel_builds_for_ampere_and_hopper():
    if not in_triton_compiler(f"{HERE}::test_every_kernel_builds_for_ampere_and_hopper"):
        return
    import triton
    import triton.language as tl

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    failed = {}
    for name, (fn, pointers, floats, constexprs, options) in _kernels().items():
        for arch in (80, 90):
            try:
                built = _build(fn, pointers, floats, constexprs, arch, **options)
                assert ".entry" in built.asm["ptx"] and built.asm["cubin"]
            except Exception as err:  # noqa: BLE001 - every kernel is tried; all failures are reported
                failed[f"{name} sm_{arch}"] = str(err).splitlines()[-1][:300] if str(err) else type(err).__name__
    assert not failed, failed

    @triton.jit
    def changes_type_in_loop(x_ptr, n, BLOCK: tl.constexpr):  # what the interpreter runs but the compiler refuses
        total = tl.zeros([], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            total = total + tl.sum(tl.load(x_ptr + start + tl.arange(0, BLOCK)), axis=0)  # int32 -> fp32
        tl.store(x_ptr, total)

    with pytest.raises(Exception, match="(?i)loop-carried"):  # noqa: B017 - Triton's compile errors share no public type
        _build(changes_type_in_loop, {"x_ptr": "fp32"}, set(), {"BLOCK": 64}, 90)
