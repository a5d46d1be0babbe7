"""Every fused Triton kernel compiles for real GPUs, sm_80 (A100) and sm_90a (H100), at the launch configurations
the models really use, forward and backward, in fp32, fp16 and bf16 (issue 13 item 3, issue 20 item 2): it
compiles in under 60 s, fits the target's shared memory, spills nothing, and the attention kernels run their dot
products on tensor cores (`mma.sync` on sm_80, `wgmma` on sm_90a) for fp16 and bf16 data (fp32 data takes the
exact fp32 dot, which has no tensor-core form, unless torch allows tf32; a kernel with no dot, such as an
elementwise pre-pass, has nothing to put on them).

No GPU is needed: the launches are captured from the models (:data:`attnzoo.kernels.aot.MODEL_CASES`, on the
meta device, kernels not run) when this module is collected, and each test compiles one of them with Triton's
ahead-of-time compiler and reads ptxas's report. One test per kernel configuration and target; configurations
that differ only in runtime values (alignment, an integer equal to 1) are represented by one. Captures and
compiles are cached on disk (``~/.cache/attnzoo/aot``, or ``$ATTNZOO_AOT_CACHE``), so a re-run costs seconds.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

from attnzoo.kernels import aot, dispatch, use_backend, window_attention
from attnzoo.kernels._triton import SM80, SM90


@functools.cache
def _launches() -> tuple[dict, list]:
    found = aot.cached_capture_models()
    return found, aot.representative(found)


def _ids(launches: list) -> list[str]:
    ids, seen = [], {}
    for ln in launches:
        base = f"{ln.target}-{ln.op}-{ln.name}-{ln.dtype}-w{ln.num_warps}-" + ",".join(f"{k}={v}" for k, v in ln.params)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


def pytest_generate_tests(metafunc):
    if "launch" in metafunc.fixturenames:
        _, launches = _launches()
        metafunc.parametrize("launch", launches, ids=_ids(launches))


@pytest.fixture(scope="session")
def compile_report(request):
    """The report of a launch. Under pytest-xdist each worker compiles its own tests' launches in one process;
    in a single pytest process, every selected launch is compiled up front in two."""
    with aot.CompilePool(jobs=1 if os.environ.get("PYTEST_XDIST_WORKER") else 2) as pool:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            selected = list(dict.fromkeys(item.callspec.params["launch"] for item in request.session.items
                                          if hasattr(item, "callspec") and "launch" in item.callspec.params))
            reports = dict(zip(selected, pool.run(selected), strict=True))
        else:
            reports = {}
        yield lambda launch: reports[launch] if launch in reports else pool.run([launch])[0]


def test_compiles_for_the_gpu(launch, compile_report):
    report = compile_report(launch)
    found = aot.problems(report)
    seen = ", ".join(_launches()[0][launch])
    assert not found, (f"{launch.name} ({launch.op}) on {launch.target}, launched by {seen}: {'; '.join(found)}\n"
                       f"{aot.table([report])}" + (f"\n{report.error}" if report.error else ""))


def test_capture_covers_every_op_on_both_targets():
    found, _ = _launches()
    ops = {"window", "halo", "linear", "sparse", "rollout", "channel", "gating"}
    for target in (SM80, SM90):
        captured = {ln.op for ln in found if ln.target == target.name}
        assert captured >= ops, f"no launch captured for {sorted(ops - captured)} on {target.name}"
        for dtype in ("fp32", "fp16", "bf16"):
            assert any(ln.dtype == dtype for ln in found if ln.target == target.name), \
                f"no {dtype} launch captured on {target.name}"


def test_capture_records_without_running_and_restores():
    """A window attention forward and backward inside `capture` records both kernels with the GPU's
    configuration (bf16 data on the tensor-core dot, where the interpreter would take the fp32 one) and runs
    neither; afterwards Triton and the dispatch are as before."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    runs = (InterpretedFunction.run, JITFunction.run)
    env = os.environ.get("TRITON_INTERPRET")
    q = torch.randn(4, 2, 49, 32, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with aot.capture(SM80) as cap, use_backend("triton"):
        window_attention(q, q, q).sum().backward()
    assert q.grad is not None
    names = [ln.name for ln in cap.launches]
    # forward; backward: rowsum(dO∘O), then dK/dV (which also writes dQ when all keys fit one block)
    assert names == ["_fwd_kernel", "_bwd_delta_kernel", "_bwd_kv_kernel"], names
    for ln in cap.launches:
        assert ln.target == "sm_80" and ln.dtype == "bf16"
        assert dict(ln.params).get("FP32", False) is False, ln.params
    assert (InterpretedFunction.run, JITFunction.run) == runs and os.environ.get("TRITON_INTERPRET") == env
    for name, module in list(sys.modules.items()):  # the kernel modules' `interpreting` is dispatch's again
        if name.startswith("attnzoo.kernels.") and hasattr(module, "interpreting"):
            assert module.interpreting is dispatch.interpreting, name


def test_problems_names_every_failure():
    launch = next(ln for ln in _launches()[1] if ln.op == "window" and ln.target == "sm_90a" and ln.dtype == "bf16")
    clean = aot.Report(launch, registers=128, spill_stores=0, spill_loads=0, stack=0, shared=1024,
                       max_shared=SM90.max_shared, seconds=1.0, mma=True, wgmma=True)
    assert aot.problems(clean) == []
    bad = aot.Report(launch, registers=255, spill_stores=8, spill_loads=8, stack=8, shared=SM90.max_shared + 1,
                     max_shared=SM90.max_shared, seconds=61.0, mma=True, wgmma=False)
    assert len(aot.problems(bad)) == 4, aot.problems(bad)
    assert aot.problems(aot.Report(launch, timed_out=True)) == ["compile over 60 s"]
    # dots of fewer than 64 rows have no wgmma form: mma.sync is sm_90a's tensor-core instruction for them
    small = dict(registers=128, spill_stores=0, spill_loads=0, stack=0, shared=1024, max_shared=SM90.max_shared,
                 seconds=1.0, dots=2, dot_rows=32)
    assert aot.problems(aot.Report(launch, mma=True, **small)) == []
    assert aot.problems(aot.Report(launch, **small)) == ["no mma.sync in the PTX"]


def test_int32_products_of_program_ids_finds_a_32_bit_offset():
    ptx = """
        mov.u32         %r1, %ctaid.x;
        ld.param.u32    %r2, [kernel_param_3];
        mul.lo.s32      %r3, %r1, %r2;
        mul.wide.s32    %rd1, %r1, %r2;
        shl.b32         %r4, %r1, 6;
        mul.lo.s32      %r5, %r4, 48;
        @%p1 mad.lo.s32 %r6, %r4, %r2, %r5;
    """
    assert aot.int32_products_of_program_ids(ptx) == ["mul.lo.s32 %r3, %r1, %r2", "mad.lo.s32 %r6, %r4, %r2, %r5"]
