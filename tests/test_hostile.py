"""Hostile files, names and signals: one bad entry never stops, hangs or poisons a batch.

Real files on the test file system: FIFOs, sockets, device and broken symlinks, a sparse 2 GB file, 255-byte
and non-UTF-8 names, a folder in the way of an output, corrupted engines, NaN weights, nested JSON, and
SIGTERM/SIGHUP sent to a real ``dermbatch run`` process.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dermbatch.cli.main import main
from dermbatch.errors import ImageError, UsageError
from dermbatch.imageio import parse_size, read_input
from dermbatch.names import MAX_STEM_BYTES, NAME_MAX, output_stem, printable, to_bytes
from dermbatch.outputs import ENCODING, ERRORS, CsvAppender, output_path, read_complete_rows
from tests.conftest import synthetic_lesion

TIMEOUT = 300  # a run that hangs (a FIFO read without O_NONBLOCK) fails the test instead of blocking CI


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


def _cli(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dermbatch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        synthetic_lesion(folder / f"img_{i:02d}.jpg", seed=i)
    return folder


# 1. only regular files are read ------------------------------------------------------------------------------

def test_fifo_socket_device_and_broken_links_are_error_rows_and_the_batch_goes_on(tiny_bundle, tmp_path):
    folder = _images(tmp_path / "in", 2)
    os.mkfifo(folder / "pipe.jpg")  # reading it without O_NONBLOCK blocks for ever
    os.symlink("/dev/zero", folder / "zeros.jpg")  # read without bound until the kernel kills the process
    os.symlink(folder / "gone.jpg", folder / "broken.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    (folder / "folder.png").mkdir()  # a folder named like an image is a folder: walked, its images processed
    synthetic_lesion(folder / "folder.png" / "inside.jpg", seed=9)
    out = tmp_path / "r.csv"
    proc = _cli("run", folder, "--out", out, "--model", tiny_bundle.path, "--tta", "none", "-b", "2")
    _, err = proc.communicate(timeout=TIMEOUT)
    server.close()
    assert proc.returncode == 3, err
    assert set(_rows(out)) == {"img_00", "img_01", "inside"}
    details = _rows(tmp_path / "r_details.csv")
    expected = {"pipe": "not a regular file: FIFO", "zeros": "not a regular file: character device",
                "broken": "broken symbolic link", "sock": "not a regular file: socket"}
    for image_id, reason in expected.items():
        assert details[image_id]["status"] == "error" and details[image_id]["error"].startswith(reason), image_id
        assert sum(f"{image_id}." in line and reason in line for line in err.splitlines()) == 1, err


def test_fifo_given_by_name_is_an_error_row_not_a_usage_error(tiny_bundle, tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    synthetic_lesion(tmp_path / "good.jpg")
    proc = _cli("run", tmp_path / "pipe.jpg", tmp_path / "good.jpg", "--out", tmp_path / "r.csv", "--model",
                tiny_bundle.path, "--tta", "none", "-q")
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 3, err
    assert set(_rows(tmp_path / "r.csv")) == {"good"}


def test_a_file_swapped_for_a_fifo_after_the_check_is_caught_on_the_open_descriptor(tmp_path, monkeypatch):
    regular = tmp_path / "regular.jpg"
    synthetic_lesion(regular)
    os.mkfifo(tmp_path / "swapped.jpg")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular) if Path(p).name == "swapped.jpg"
                        else real_stat(p, *a, **k))  # the listing saw a regular file; then it was swapped
    start = time.perf_counter()
    with pytest.raises(ImageError, match="not a regular file: FIFO"):
        read_input(tmp_path / "swapped.jpg")
    assert time.perf_counter() - start < 5  # opened without blocking


# 2. bounded reads --------------------------------------------------------------------------------------------

_RSS_RUN = ("import resource, sys\nfrom dermbatch.cli.main import main\ncode = main(sys.argv[1:])\n"
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)")


def _run_rss(*args) -> tuple[int, int, str]:
    proc = subprocess.run([sys.executable, "-c", _RSS_RUN, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)
    rss = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("maxrss_kb")))
    return proc.returncode, rss, proc.stderr


def test_sparse_2gb_file_is_an_error_row_without_being_read(tiny_bundle, tmp_path):
    folder = _images(tmp_path / "in", 2)
    common = ["--model", tiny_bundle.path, "--tta", "none", "-q"]
    code, normal_rss, _ = _run_rss("run", folder, "--out", tmp_path / "a.csv", *common)
    assert code == 0
    with open(folder / "huge.jpg", "wb") as fh:
        fh.truncate(2 << 30)  # sparse: 2 GB long, no disk used
    code, rss, err = _run_rss("run", folder, "--out", tmp_path / "b.csv", *common)
    assert code == 3, err
    assert set(_rows(tmp_path / "b.csv")) == {"img_00", "img_01"}
    reason = _rows(tmp_path / "b_details.csv")["huge"]["error"]
    assert reason == "file is 2.0 GB, over the --max-file-size limit of 512.0 MB; not read"
    assert rss < normal_rss + 200_000, (rss, normal_rss)  # kB: reading it would add 2 GB


def test_max_file_size_option(tiny_bundle, tmp_path, capsys):
    folder = _images(tmp_path / "in", 2)
    size = (folder / "img_00.jpg").stat().st_size
    common = ["--model", str(tiny_bundle.path), "--tta", "none", "-q"]
    assert main(["run", str(folder), "--out", str(tmp_path / "a.csv"), "--max-file-size", str(size - 1),
                 *common]) == 3
    assert "over the --max-file-size limit" in _rows(tmp_path / "a_details.csv")["img_00"]["error"]
    assert main(["run", str(folder), "--out", str(tmp_path / "b.csv"), "--max-file-size", "0", *common]) == 0
    assert main(["run", str(folder), "--out", str(tmp_path / "c.csv"), "--max-file-size", "lots", *common]) == 2
    assert "--max-file-size 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("512M", 512 << 20), ("2G", 2 << 30), ("64k", 65536),
                                            ("1.5MB", 3 << 19), ("1000", 1000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


# 3. any file name yields outputs -----------------------------------------------------------------------------

HOSTILE_NAMES = [b"a" * (NAME_MAX - 4) + b".jpg", b"back\\slash.jpg", b"new\nline.jpg", b"tab\there.jpg",
                 b'say "hi", ok.jpg', b"caf\xe9-latin1.jpg", b"\xff\xfe.jpg", b"plain.jpg"]


def test_hostile_names_all_yield_outputs_and_rows_that_read_back(tiny_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    synthetic_lesion(tmp_path / "src.jpg")
    for name in HOSTILE_NAMES:
        shutil.copy(tmp_path / "src.jpg", os.path.join(os.fsencode(folder), name))
    out, masks, ann = tmp_path / "r.csv", tmp_path / "masks", tmp_path / "ann"
    code = main(["run", str(folder), "--out", str(out), "--model", str(tiny_bundle.path), "--masks", str(masks),
                 "--annotate", str(ann), "--report", str(tmp_path / "report"), "--tta", "none", "-q"])
    assert code == 0
    ids = {os.fsdecode(name)[: -len(".jpg")] for name in HOSTILE_NAMES}
    assert set(_rows(out)) == ids  # the original ids, byte for byte
    details = _rows(tmp_path / "r_details.csv")
    stems = {details[i]["output_stem"] for i in ids}
    assert len(stems) == len(ids) and details["plain"]["output_stem"] == "plain"
    assert {p.name for p in masks.iterdir()} == {f"{s}_segmentation.png" for s in stems}
    assert len(list(ann.iterdir())) == len(ids)
    assert os.fsencode(details["caf\udce9-latin1"]["path"]).endswith(b"caf\xe9-latin1.jpg")


def test_one_name_that_cannot_be_printed_is_shown_on_one_line():
    assert printable("new\nline\udce9") == "new\\nline\\xe9"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=NAME_MAX - 4).filter(lambda b: b"/" not in b and b"\0" not in b),
                min_size=1, max_size=4, unique=True))
def test_any_file_name_gets_a_unique_writable_stem_and_a_row_that_reads_back(tmp_path_factory, names):
    folder = tmp_path_factory.mktemp("names")
    ids = [os.fsdecode(name) for name in names]  # ids as Python gets them from os.listdir / Path.stem
    stems = [output_stem(i) for i in ids]
    assert len(set(stems)) == len(stems)
    for image_id, stem in zip(ids, stems, strict=True):
        assert len(to_bytes(stem)) <= MAX_STEM_BYTES
        path = output_path(folder, image_id, "_guided_gradcam.jpg")
        assert path.name == f"{stem}_guided_gradcam.jpg"
        path.with_name(f".{path.name}.tmp").write_bytes(b"x")  # the longest name dermbatch writes
        path.write_bytes(b"x")
    writer = CsvAppender(folder / "r.csv", ("image", "x"))
    writer.append([[i, "1"] for i in ids])
    writer.close()
    assert [row["image"] for row in read_complete_rows(folder / "r.csv")] == ids


def test_kept_and_hashed_stems_never_meet():
    hashed = output_stem("x\ny")
    assert hashed != "x\ny" and output_stem(hashed) != hashed  # an id that looks hashed is hashed too


# 4. a failure to write one image's outputs is that image's error row -----------------------------------------

def test_one_unwritable_output_is_that_images_error_row(tiny_bundle, tmp_path, capsys):
    folder = _images(tmp_path / "in", 4)
    masks = tmp_path / "masks"
    (masks / "img_02_segmentation.png").mkdir(parents=True)  # a folder in the way of one mask
    out = tmp_path / "r.csv"
    code = main(["run", str(folder), "--out", str(out), "--model", str(tiny_bundle.path), "--masks", str(masks),
                 "--annotate", str(tmp_path / "ann"), "--tta", "none", "-b", "2"])
    assert code == 3
    assert set(_rows(out)) == {"img_00", "img_01", "img_03"}
    row = _rows(tmp_path / "r_details.csv")["img_02"]
    assert row["status"] == "error" and row["error"].startswith("cannot write its outputs (Is a directory")
    assert not (tmp_path / "ann" / "img_02_annotated.jpg").exists()  # no half set of files
    assert "1 failed" in capsys.readouterr().err


# 5. cached engines are verified before use; no nan ever reaches the CSV --------------------------------------

@pytest.fixture
def own_bundle(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle (its engines folder is this test's)."""
    return Path(shutil.copytree(tiny_bundle.path, tmp_path / "bundle", ignore=shutil.ignore_patterns("engines")))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_engine_file_is_refused_with_one_line(own_bundle, tmp_path, capsys):
    assert main(["build-engine", "--model", str(own_bundle), "--target", "onnxruntime"]) == 0
    folder = _images(tmp_path / "in", 2)
    run = ["run", str(folder), "--model", str(own_bundle), "--tta", "none", "-q"]
    assert main([*run, "--out", str(tmp_path / "a.csv"), "--backend", "onnxruntime"]) == 0
    engine = own_bundle / "engines" / "onnxruntime-fp32" / "segmentation.onnx"
    _flip_byte(engine)
    capsys.readouterr()
    for backend in ("onnxruntime", "auto"):
        assert main([*run, "--out", str(tmp_path / f"{backend}.csv"), "--backend", backend]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"Error: {engine}: engine file changed since it was built")
        assert "dermbatch build-engine" in err[0]


def test_changed_first_use_engine_is_rebuilt(own_bundle, tmp_path, monkeypatch, capsys):
    import dermbatch.bundle

    monkeypatch.setattr(dermbatch.bundle, "DEFAULT_BUNDLE_DIR", own_bundle)  # this copy plays the installed one
    monkeypatch.setenv("DERMBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DERMBATCH_NO_AUTO_ENGINE", raising=False)
    folder = _images(tmp_path / "in", 2)
    run = ["run", str(folder), "--model", str(own_bundle), "--tta", "none", "-q"]
    assert main([*run, "--out", str(tmp_path / "a.csv")]) == 0
    used = json.loads((tmp_path / "a_manifest.json").read_text())["runtime"]
    folder = Path(used["engine"])  # OpenVINO's when installed (built from an ONNX graph beside it), else ONNX Runtime's
    _flip_byte(next(folder.glob("classification.bin"), folder / "classification.onnx"))
    assert main([*run, "--out", str(tmp_path / "b.csv")]) == 0
    err = capsys.readouterr().err
    assert err.count("engine file changed since it was built") == 1 and "built again" in err
    from dermbatch.backends.store import changed_file, read_info

    assert changed_file(folder, read_info(folder)) is None  # rebuilt in place, and used
    assert json.loads((tmp_path / "b_manifest.json").read_text())["runtime"]["backend"] == used["backend"]
    assert _rows(tmp_path / "a.csv") == _rows(tmp_path / "b.csv")


def test_non_finite_model_output_is_an_error_row_and_never_nan_in_the_csv(own_bundle, tmp_path):
    from safetensors.torch import load_file

    from dermbatch.bundle import load_bundle, save_weights, write_manifest

    bundle = load_bundle(own_bundle)
    manifest = json.loads((own_bundle / "bundle.json").read_text())
    for fold in bundle.classification.folds:
        name = bundle.classification.weight_file(fold)
        state = load_file(str(own_bundle / name))
        head = next(k for k in state if k.endswith("bias") and state[k].shape[0] == len(bundle.classes))
        state[head][0] = float("nan")
        manifest["weights"][name] = save_weights(own_bundle, "classification", fold, state)[1]
    write_manifest(own_bundle, manifest)
    folder = _images(tmp_path / "in", 3)
    out = tmp_path / "r.csv"
    assert main(["run", str(folder), "--out", str(out), "--model", str(own_bundle), "--backend", "torch",
                 "--tta", "none"]) == 3
    assert "nan" not in out.read_text().lower() and _rows(out) == {}
    details = _rows(tmp_path / "r_details.csv")
    assert all(r["error"].startswith("model produced non-finite output") for r in details.values())


# 6. SIGTERM and SIGHUP behave like Ctrl-C (SIGINT) --------------------------------------------------------------------

@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_stop_signal_flushes_prints_the_resume_line_and_resume_completes(tiny_bundle, tmp_path, sig, code):
    folder = _images(tmp_path / "images", 30)
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    args = ["run", folder, "--out", out, "--model", tiny_bundle.path, "--masks", masks, "-b", "2", "--workers",
            "1", "--tta", "flip", "-q"]
    proc = _cli(*args)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 5):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, err
    assert ("Interrupted:" if sig == signal.SIGINT else f"Interrupted by {sig.name}:") in err and "--resume" in err
    partial = out.read_text()
    assert partial.endswith("\n") and 4 <= partial.count("\n") - 1 < 30  # flushed, whole rows only
    resumed = _cli(*args, "--resume")
    _, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err
    ids = [row for row in _rows(out)]
    assert out.read_text().count("\n") == 31 and sorted(ids) == [f"img_{i:02d}" for i in range(30)]
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{i}_segmentation.png" for i in ids)


# 7. untrusted JSON is bounded ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nests 100000 levels deep, over the limit of 64; not parsed"),
    (None, "over the 16,777,216-byte limit; not read"),
])
def test_hostile_bundle_json_is_one_line(tmp_path, capsys, content, reason):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if content is None:
        with open(bundle / "bundle.json", "wb") as fh:
            fh.truncate(20 << 20)
    else:
        (bundle / "bundle.json").write_text(content)
    synthetic_lesion(tmp_path / "a.jpg")
    assert main(["run", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "r.csv"), "--model", str(bundle)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: {bundle / 'bundle.json'}: manifest ") and reason in err[0]


def test_hostile_engine_json_is_one_line(own_bundle, tmp_path, capsys):
    engine = own_bundle / "engines" / "onnxruntime-fp32"
    engine.mkdir(parents=True)
    (engine / "engine.json").write_text('{"a": ' * 5000 + "1" + "}" * 5000)
    synthetic_lesion(tmp_path / "a.jpg")
    assert main(["run", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "r.csv"), "--model", str(own_bundle),
                 "--backend", "onnxruntime"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine description nests 5000 levels deep" in err[0]


def test_usage_error_for_negative_limit(tiny_bundle):
    from dermbatch.predictor import Predictor

    with pytest.raises(UsageError, match="max-file-size"):
        Predictor(tiny_bundle.path, max_bytes=-1)
