"""The logic around the GPU paths (TensorRT, ONNX Runtime CUDA), tested on the CPU: what can run without a GPU
does, against known answers; the GPU calls themselves are in the ``tensorrt``/``cuda`` tests."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from dermbatch.backends.tensorrt import batch_plan, cpu_engine_target, cuda_index, usable_plans, write_sidecar
from dermbatch.errors import BackendError


def test_engine_json_names_the_file_the_runtime_loads_whatever_the_folder_lists_first(tiny_bundle, tmp_path):
    from engines.checks import engine_info

    folder = tmp_path / "tensorrt-fp16"
    folder.mkdir()
    for task in ("segmentation", "classification"):  # a TensorRT folder keeps the ONNX it was built from
        (folder / f"{task}.onnx").write_bytes(b"onnx")
        (folder / f"{task}.plan").write_bytes(b"plan")
    info = engine_info(tiny_bundle, "tensorrt", "fp16", folder, {})
    assert {t["file"] for t in info["tasks"].values()} == {"segmentation.plan", "classification.plan"}
    (folder / "classification.plan").unlink()
    with pytest.raises(BackendError, match="classification.plan: missing"):
        engine_info(tiny_bundle, "tensorrt", "fp16", folder, {})


@pytest.mark.parametrize(("device", "index"), [("auto", None), ("cuda", None), ("cuda:0", 0), ("cuda:3", 3)])
def test_cuda_index_of_a_device(device, index):
    assert cuda_index(device) == index


def test_tensorrt_refuses_the_cpu_and_bad_devices():
    with pytest.raises(BackendError, match=f"not --device cpu; use --backend {cpu_engine_target()}"):
        cuda_index("cpu")
    with pytest.raises(BackendError, match="cuda:N"):
        cuda_index("cuda:x")


@pytest.mark.parametrize(("count", "low", "high", "plan"), [
    (10, 1, 4, [(0, 4, 4), (4, 8, 4), (8, 10, 2)]),
    (10, 4, 4, [(0, 4, 4), (4, 8, 4), (8, 10, 4)]),  # the last chunk padded up to MIN
    (3, 8, 32, [(0, 3, 8)]),  # a calibration set smaller than MIN
    (32, 1, 32, [(0, 32, 32)]),
])
def test_batch_plan_keeps_every_chunk_within_the_profile(count, low, high, plan):
    assert batch_plan(count, low, high) == plan
    assert all(low <= size <= high and stop - start <= size for start, stop, size in plan)


def test_trt_runner_pads_to_min_and_slices_back():
    """``TrtRunner.__call__`` over a stand-in for the one TensorRT call: rows come back in order, padding dropped."""
    from dermbatch.backends.tensorrt import TrtRunner

    runner = TrtRunner.__new__(TrtRunner)
    runner.min_batch, runner.max_batch = 4, 6
    seen = []

    def execute(x):  # (N, C) -> stacked folds (2, N, C): fold k adds k
        seen.append(len(x))
        return torch.stack([x, x + 1])

    runner._execute = execute
    x = torch.arange(13.0).reshape(13, 1)
    out = runner(x)
    assert seen == [6, 6, 4]
    assert out.shape == (2, 13, 1) and torch.equal(out[0], x) and torch.equal(out[1], x + 1)


def test_auto_skips_a_plan_its_sidecar_check_would_refuse(tmp_path):
    here = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    info = {"precision": "fp16", "tasks": {"segmentation": {"file": "segmentation.plan"}}}
    plan = tmp_path / "segmentation.plan"
    plan.write_bytes(b"plan")
    write_sidecar(plan, {**here, "precision": "fp16"})
    assert usable_plans(tmp_path, info, here, tmp_path) is None
    write_sidecar(plan, {**here, "tensorrt": "10.13.0.30", "precision": "fp16"})  # same folder key, other patch
    assert "tensorrt 10.13.0.30, this machine has 10.13.0.35" in usable_plans(tmp_path, info, here, tmp_path)


def test_unfit_engines_are_refused_and_deleted(tmp_path):
    from engines.checks import refuse_unfit

    good = {"segmentation": {"max_abs_diff": 0.01, "mean_mask_iou": 0.999, "finite": True},
            "classification": {"max_abs_diff": 0.01, "top1_agreement": 1.0, "finite": True}}
    folder = tmp_path / "plan"
    folder.mkdir()
    refuse_unfit(folder, good, 0.99, "TensorRT fp16")
    assert folder.exists()
    nan = {**good, "classification": {**good["classification"], "max_abs_diff": float("nan"), "finite": False}}
    with pytest.raises(BackendError, match="non-finite"):
        refuse_unfit(folder, nan, 0.99, "TensorRT fp16")
    assert not folder.exists()
    folder.mkdir()
    low = {**good, "classification": {**good["classification"], "top1_agreement": 0.9}}
    with pytest.raises(BackendError, match=r"0.900 < --min-agreement 0.99"):
        refuse_unfit(folder, low, 0.99, "TensorRT fp16")


def test_half_export_leaves_the_callers_module_in_fp32(monkeypatch, tmp_path):
    """TensorRT 11's fp16 export casts a copy (the check compares against the true fp32 module)."""
    from engines import export

    module = torch.nn.Conv2d(3, 2, 1)
    before = module.weight.detach().clone()
    captured = {}

    def fake_export(m, args, path, **kwargs):  # stands in for torch.onnx.export, which needs CUDA for half
        captured["dtype"] = next(m.parameters()).dtype
        raise RuntimeError("stop")

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.raises(RuntimeError, match="stop"):
        export.export_module(module, (4, 4), tmp_path / "x.onnx", half=True)
    assert captured["dtype"] == torch.float16
    assert module.weight.dtype == torch.float32 and torch.equal(module.weight, before)


def test_onnxruntime_cuda_device_id_and_real_providers(monkeypatch):
    import onnxruntime as ort

    from dermbatch.backends.onnxruntime import providers_for, session_device

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            providers_for("cuda:1")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    asked = providers_for("cuda:1")
    assert asked == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert session_device("cuda:1", asked, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda:1"
    assert session_device("auto", providers_for("auto"), ["CPUExecutionProvider"]) == "cpu"  # fell back: say so
    with pytest.raises(BackendError, match="could not start its CUDA provider"):
        session_device("cuda:1", asked, ["CPUExecutionProvider"])


def test_build_engine_default_target_is_what_run_auto_uses_on_this_machine():
    from engines.build import resolve_target

    expected = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: auto may pick TensorRT")
    assert resolve_target("auto", None) == (expected, "fp32")
