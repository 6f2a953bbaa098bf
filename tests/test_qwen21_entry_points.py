"""Issue 16's tightening of the entry points: one dtype rule (``auto``) for the CLI, Python and the
server, and ``uniref.flow`` owning its schedule type instead of importing the model package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen21_tiny
from cli_helpers import run_cli
from uniref import flow
from uniref.errors import ModelError
from uniref.models.base import ScheduleSpec, resolve_dtype
from uniref.pipeline import EditPipeline


def test_flow_imports_nothing_from_the_models_package() -> None:
    code = "import sys, uniref.flow; print(sorted(m for m in sys.modules if m.startswith('uniref.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['uniref.flow']"
    assert ScheduleSpec is flow.ScheduleSpec  # still importable from models.base, one type


@pytest.mark.parametrize(
    ("cuda", "bf16", "device", "expected"),
    [
        (False, False, None, torch.float32),
        (True, True, None, torch.bfloat16),  # no device: the Qwen loaders' default, cuda when available
        (True, True, "cpu", torch.float32),  # bf16 matmuls on CPU are emulated: never the default there
        (True, True, "cuda", torch.bfloat16),
        (True, False, "cuda:0", torch.float32),  # a GPU without bf16
    ],
)
def test_auto_dtype_is_bf16_only_on_a_cuda_device_that_has_it(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, bf16: bool, device: str | None, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", device) == expected


def test_dtype_names_and_torch_dtypes_pass_through_and_unknown_names_are_model_errors() -> None:
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("fp16") == torch.float16 and resolve_dtype(torch.float64, "cuda") == torch.float64
    with pytest.raises(ModelError, match="dtype 'fp64': expected auto or one of fp32"):
        resolve_dtype("fp64")


def test_from_pretrained_defaults_to_auto_for_tiny_and_qwen_image_21_folders(tmp_path: Path) -> None:
    assert EditPipeline.from_pretrained("tiny-random").model.dtype == torch.float32
    assert EditPipeline.from_pretrained("tiny-random", device="cpu", dtype="bf16").model.dtype == torch.bfloat16
    folder = qwen21_tiny.save_folder(qwen21_tiny.build_components(), tmp_path / "qwen21")
    assert EditPipeline.from_pretrained(folder, device="cpu").model.dtype == torch.float32
    with pytest.raises(ModelError, match="dtype 'half'"):
        EditPipeline.from_pretrained("tiny-random", dtype="half")


def test_serve_dtype_is_checked_before_loading_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["serve", "--model", "tiny-random", "--dtype", "fp64"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--dtype 'fp64': choose one of auto, fp32, bf16, fp16" in err


@pytest.mark.parametrize(("cuda", "bf16", "expected"), [(False, False, torch.float32), (True, True, torch.bfloat16)])
def test_train_config_dtype_defaults_to_auto_and_follows_the_one_rule(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, bf16: bool, expected: torch.dtype
) -> None:
    from uniref.train.config import ModelSection
    from uniref.train.runtime import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    section = ModelSection(name="tiny-random", tiny={"width": 32, "depth": 1, "heads": 2})
    assert section.dtype == "auto"
    moved: list[torch.dtype | None] = []  # no GPU here: record the dtype the denoiser is moved to instead
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: moved.append(kw.get("dtype")) or self)
    build_model(section, torch.device("cuda" if cuda else "cpu"))
    assert moved[-1] == expected


def test_device_defaults_to_auto_and_a_bad_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from uniref.cli.edit import device_kwargs

    assert device_kwargs("auto") == {} and device_kwargs("cuda:1") == {"device": "cuda:1"}
    code, _, err = run_cli(["serve", "--model", "tiny-random", "--device", "gpu0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device 'gpu0': choose auto, cpu, cuda, cuda:N or mps" in err
