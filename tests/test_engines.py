"""ONNX export and the ONNX Runtime backend against torch; TensorRT's surroundings (no TensorRT here)."""

import json
import shutil

import numpy as np
import pytest
import torch

from dermbatch.cli.main import main
from dermbatch.errors import BackendError
from tests.conftest import HAM, real_images


def _run_rows(images, out, bundle, backend, precision="auto"):
    assert main(["run", *map(str, images), "--out", str(out), "--model", str(bundle), "--backend", backend,
                 "--precision", precision, "--masks", str(out.parent / "masks"), "-q"]) == 0
    return {line.split(",")[0]: np.array(line.split(",")[1:], float) for line in out.read_text().splitlines()[1:]}


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory):
    root = shutil.copytree(tiny_bundle.path, tmp_path_factory.mktemp("eb") / "bundle")
    images = tmp_path_factory.mktemp("calib")
    from tests.conftest import synthetic_lesion

    for i in range(6):
        synthetic_lesion(images / f"c{i}.jpg", seed=10 + i)
    assert main(["build-engine", "--model", str(root), "--target", "onnxruntime", "--calibration", str(images)]) == 0
    return root


def test_engine_is_stored_with_its_provenance(engine_bundle):
    import onnx

    folder = engine_bundle / "engines" / "onnxruntime-fp32"
    info = json.loads((folder / "engine.json").read_text())
    assert info["tasks"]["segmentation"]["folds"] == [0, 1] and info["precision"] == "fp32"
    graph = onnx.load(str(folder / "segmentation.onnx")).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis only
    assert all(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])
    for task in ("segmentation", "classification"):
        assert info["agreement"][task]["max_abs_diff"] < 1e-3


def test_onnxruntime_run_reproduces_torch(engine_bundle, tmp_path):
    images = real_images(HAM, 12)
    rows = {backend: _run_rows(images, tmp_path / backend / "r.csv", engine_bundle, backend)
            for backend in ("torch", "onnxruntime")}
    manifest = json.loads((tmp_path / "onnxruntime" / "r_manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "onnxruntime"
    for image_id, probs in rows["torch"].items():
        np.testing.assert_allclose(rows["onnxruntime"][image_id], probs, atol=1e-3)
        assert rows["onnxruntime"][image_id].argmax() == probs.argmax()
    import cv2

    for mask in (tmp_path / "torch" / "masks").iterdir():
        a, b = cv2.imread(str(mask), 0) > 0, cv2.imread(str(tmp_path / "onnxruntime" / "masks" / mask.name), 0) > 0
        union = np.logical_or(a, b).sum()
        assert union == 0 or np.logical_and(a, b).sum() / union >= 0.99


def test_auto_backend_picks_the_built_engine_and_logs_it(engine_bundle, tmp_path, caplog):
    import logging

    from dermbatch.backends import resolve_backend_name
    from dermbatch.bundle import load_bundle

    with caplog.at_level(logging.INFO, logger="dermbatch"):
        assert resolve_backend_name("auto", load_bundle(engine_bundle), "cpu") == "onnxruntime"
    assert "onnxruntime (auto" in caplog.text


def test_engine_from_other_weights_is_refused(engine_bundle, tmp_path):
    from dermbatch.backends.onnxruntime import OrtBackend
    from dermbatch.bundle import load_bundle

    copy = shutil.copytree(engine_bundle, tmp_path / "b")
    (copy / "engines" / "onnxruntime-fp32" / "engine.json").write_text(json.dumps(
        json.loads((copy / "engines" / "onnxruntime-fp32" / "engine.json").read_text()) | {"weights_fingerprint": "0"}))
    with pytest.raises(BackendError, match="built from other weights.*build-engine --model"):
        OrtBackend(load_bundle(copy), "cpu", {"segmentation": (0, 1)})


def test_missing_engine_names_the_build_command(tiny_bundle):
    from dermbatch.backends.onnxruntime import OrtBackend

    with pytest.raises(BackendError, match="dermbatch build-engine --model .* --target onnxruntime"):
        OrtBackend(tiny_bundle, "cpu", {"segmentation": (0, 1)})


def test_tensorrt_without_tensorrt_is_one_clear_error(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["run", str(real_images(HAM, 1)[0]), "--out", str(tmp_path / "r.csv"), "--model",
                 str(tiny_bundle.path), "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    from dermbatch.backends.tensorrt import cpu_engine_target  # the CPU engine `run --backend auto` prefers here

    assert len(err) == 1 and "needs TensorRT and an NVIDIA GPU" in err[0]
    assert f"--backend {cpu_engine_target()}" in err[0]
    assert main(["build-engine", "--model", str(tiny_bundle.path), "--target", "tensorrt"]) == 1
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_sidecar_mismatch_is_refused_with_the_rebuild_command(tmp_path):
    from dermbatch.backends.tensorrt import check_sidecar, device_tag, write_sidecar

    plan = tmp_path / "segmentation.plan"
    plan.write_bytes(b"plan")
    here = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    write_sidecar(plan, {**here, "precision": "fp16", "profile": {"max": 32}})
    assert check_sidecar(plan, here, tmp_path, "fp16")["profile"]["max"] == 32
    with pytest.raises(BackendError, match=r"compute_capability 9.0, this machine has 8.9.*build-engine --model"):
        check_sidecar(plan, {**here, "compute_capability": "8.9", "gpu": "NVIDIA L4"}, tmp_path, "fp16")
    with pytest.raises(BackendError, match="tensorrt 10.13.0, this machine has 11.0.0"):
        check_sidecar(plan, {**here, "tensorrt": "11.0.0"}, tmp_path, "fp16")
    plan.with_name("segmentation.plan.json").unlink()
    with pytest.raises(BackendError, match="no sidecar"):
        check_sidecar(plan, here, tmp_path, "fp16")
    assert device_tag(here) == "H10080GBHBM3-sm90-trt10.13"


def _has_tensorrt():
    from dermbatch.backends.tensorrt import tensorrt_available

    return tensorrt_available()[0]


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_fp16_plan_reproduces_torch(tiny_bundle, tmp_path):
    root = shutil.copytree(tiny_bundle.path, tmp_path / "bundle")
    images = real_images(HAM, 8)
    assert main(["build-engine", "--model", str(root), "--target", "tensorrt", "--batch", "1,8,32",
                 "--calibration", str(images[0].parent)]) == 0
    plan_dirs = list((root / "engines").glob("tensorrt-fp16-*"))
    assert len(plan_dirs) == 1 and (plan_dirs[0] / "segmentation.plan.json").exists()
    outs = {}
    for backend in ("torch", "tensorrt"):
        outs[backend] = tmp_path / backend / "r.csv"
        assert main(["run", *map(str, images), "--out", str(outs[backend]), "--model", str(root), "--backend",
                     backend, "--device", "cuda", "--precision", "fp16", "-q"]) == 0
    rows = {b: [np.array(line.split(",")[1:], float) for line in p.read_text().splitlines()[1:]]
            for b, p in outs.items()}
    for a, b in zip(rows["torch"], rows["tensorrt"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-2)



def test_openvino_engines_reproduce_onnxruntime_and_auto_prefers_them(engine_bundle, tmp_path, caplog):
    import logging

    pytest.importorskip("openvino")
    from dermbatch.backends import resolve_backend_name
    from dermbatch.bundle import load_bundle

    bundle = shutil.copytree(engine_bundle, tmp_path / "b")
    images = real_images(HAM, 8)
    assert main(["build-engine", "--model", str(bundle), "--target", "openvino"]) == 0
    info = json.loads((bundle / "engines" / "openvino-fp32" / "engine.json").read_text())
    assert info["tasks"]["classification"]["file"] == "classification.xml" and "openvino" in info["versions"]
    assert info["tasks"]["classification"]["weights_file"] == "classification.bin"
    assert info["agreement"]["classification"]["max_abs_diff"] < 1e-3
    reference = _run_rows(images, tmp_path / "ort" / "r.csv", bundle, "onnxruntime")
    ours = _run_rows(images, tmp_path / "ov" / "r.csv", bundle, "openvino")
    assert ours.keys() == reference.keys()
    for image_id, probs in reference.items():
        np.testing.assert_allclose(ours[image_id], probs, atol=1e-3)
    manifest = json.loads((tmp_path / "ov" / "r_manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "openvino" and manifest["runtime"]["precision"] == "fp32"
    with caplog.at_level(logging.INFO, logger="dermbatch"):
        assert resolve_backend_name("auto", load_bundle(bundle), "cpu") == "openvino"
    from dermbatch.backends.openvino import cpu_has_bf16

    if not cpu_has_bf16():
        return
    assert main(["build-engine", "--model", str(bundle), "--target", "openvino", "--precision", "bf16",
                 "--min-agreement", "0"]) == 0
    half = _run_rows(images, tmp_path / "bf16" / "r.csv", bundle, "openvino", "bf16")
    manifest = json.loads((tmp_path / "bf16" / "r_manifest.json").read_text())
    assert manifest["runtime"]["precision"] == "bf16"
    differences = [np.abs(half[i] - reference[i]).max() for i in reference]
    assert 0 < max(differences) < 0.05  # bf16 really ran (not bit-equal to fp32) and stayed close


def test_openvino_refuses_bf16_on_a_cpu_without_it_and_a_gpu_device(engine_bundle):
    pytest.importorskip("openvino")
    from dermbatch.backends.openvino import OpenVinoBackend, check_precision
    from dermbatch.bundle import load_bundle

    with pytest.raises(BackendError, match="bf16 needs a CPU with AMX or AVX512-BF16; this one offers FP32, INT8"):
        check_precision(["FP32", "INT8"], "bf16")
    check_precision(["FP32", "INT8"], "fp32")
    with pytest.raises(BackendError, match="runs on the CPU, not --device cuda"):
        OpenVinoBackend(load_bundle(engine_bundle), "cuda", {"segmentation": (0, 1)})
    with pytest.raises(BackendError, match="no OpenVINO engine .*--target openvino --precision bf16"):
        OpenVinoBackend(load_bundle(engine_bundle), "cpu", {"segmentation": (0, 1)}, precision="bf16")


@pytest.mark.parametrize("tuned_from", [None, 3])
def test_folds_sharing_a_frozen_backbone_export_one_feature_pass(tmp_path, tuned_from):
    pytest.importorskip("onnxruntime")
    import onnx

    from engines.export import compare, export_module, load_stacked
    from tests.conftest import shared_backbone_bundle

    bundle, _ = shared_backbone_bundle(tmp_path / "b", tuned_from)
    stacked = load_stacked(bundle, "classification", (0, 1))
    assert stacked.shared is not None
    path = export_module(stacked, (64, 64), tmp_path / "cls.onnx")
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    single = export_module(load_stacked(bundle, "classification", (0,)), (64, 64), tmp_path / "one.onnx")
    backbone = stacked.folds[1].backbone  # the second fold adds only the convolutions it does not share
    own = 0 if tuned_from is None else sum(isinstance(m, torch.nn.Conv2d) for part in
                                           (*backbone.blocks[tuned_from:], backbone.conv_head) for m in part.modules())
    assert (own > 0) == (tuned_from is not None)
    assert len(convs) == len([n for n in onnx.load(str(single)).graph.node if n.op_type == "Conv"]) + own
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    per_fold = np.stack([stacked.folds[f](torch.from_numpy(x)).detach().numpy() for f in (0, 1)])
    assert not np.allclose(per_fold[0], per_fold[1])
    result = compare(path, stacked, x, "classification")
    assert result["max_abs_diff"] < 1e-4
    import onnxruntime as ort

    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_allclose(ours, per_fold, atol=1e-4)  # each fold's own classifier on the shared features
