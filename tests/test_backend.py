"""The one place where an op's backend is chosen: argument, environment, auto."""

import pytest
import torch

from wsss_fast.ops._backend import BACKEND_ENV_VAR, resolve_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_auto_prefers_triton_on_cuda_and_compiled_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("op", CUDA, ("triton", "reference")) == "triton"
    assert resolve_backend("op", CPU, ("triton", "reference")) == "reference"
    assert resolve_backend("op", CPU, ("compiled", "reference")) == "compiled"
    assert resolve_backend("op", CUDA, ("compiled", "reference")) == "compiled"
    assert resolve_backend("op", CPU, ("triton", "torch", "reference")) == "torch"
    assert resolve_backend("op", CUDA, ("triton", "torch", "reference")) == "triton"


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert resolve_backend("op", CPU, ("compiled", "reference")) == "reference"
    assert resolve_backend("op", CPU, ("compiled", "reference"), "compiled") == "compiled"
    assert resolve_backend("op", CPU, ("compiled", "reference"), "AUTO") == "compiled"


def test_environment_naming_a_missing_backend_falls_back_to_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert resolve_backend("op", CPU, ("compiled", "reference")) == "compiled"


def test_argument_naming_a_missing_backend_is_an_error():
    with pytest.raises(ValueError, match=r"backend='triton' is not available for dense_crf"):
        resolve_backend("dense_crf", CPU, ("compiled", "reference"), "triton")


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_unknown_backend_names_its_source(monkeypatch, source):
    if source == "environment":
        monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
        with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
            resolve_backend("op", CPU, ("reference",))
    else:
        with pytest.raises(ValueError, match="backend must be one of"):
            resolve_backend("op", CPU, ("reference",), "fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("op", CPU, ("triton", "reference"), "triton")
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert resolve_backend("op", CPU, ("triton", "reference")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", CPU, ("triton", "reference"), "triton") == "triton"
