import pytest
import torch

from attnzoo.kernels import dispatch, trace, use_backend, window_attention


def _qkv(D=16):
    return [torch.randn(2, 1, 16, D) for _ in range(3)]


def test_cpu_tensors_take_the_torch_path():
    with trace() as calls:
        window_attention(*_qkv())
    assert calls == [("window_attention", "torch")]


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    with trace() as calls:
        window_attention(*_qkv())
    assert calls == [("window_attention", "reference")]


def test_context_manager_overrides_env_var_and_restores(monkeypatch):
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    with trace() as calls:
        with use_backend("torch"):
            with use_backend("triton"):
                window_attention(*_qkv())
            window_attention(*_qkv())
        window_attention(*_qkv())
    assert [b for _, b in calls] == ["triton", "torch", "reference"]


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="use_backend='cuda' is not an attnzoo backend; expected one of torch"):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("ATTNZOO_BACKEND", "fast")
    with pytest.raises(ValueError, match="ATTNZOO_BACKEND='fast' is not an attnzoo backend"):
        window_attention(*_qkv())


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        window_attention(*_qkv())


def test_auto_choice_respects_what_the_kernel_supports():
    q = torch.randn(1, 1, 8, 16)
    assert dispatch.select_backend("op", q, triton_supported=False) == "torch"
    if torch.cuda.is_available():
        q = q.cuda()
        assert dispatch.select_backend("op", q, triton_supported=True) == "triton"
        assert dispatch.select_backend("op", q, triton_supported=False) == "torch"


def test_trace_is_off_outside_the_block():
    with trace() as calls:
        pass
    window_attention(*_qkv())
    assert calls == []
