"""Bad and unusual inputs, interruptions and output failures, with real subprocesses where it matters."""

import csv
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from dermbatch.cli.main import main
from dermbatch.outputs import RunLock
from tests.conftest import synthetic_lesion


def _png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def build_corpus(folder):
    """Write every kind; return {file name: None (must succeed) or the reason it must fail with}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    good = folder / "good.jpg"
    synthetic_lesion(good)
    expected = {"good.jpg": None}

    def put(name, data, reason=None):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data) if isinstance(data, bytes) else data(path)
        expected[name] = reason

    put("zero_bytes.jpg", b"", "empty file")
    put("truncated.jpg", good.read_bytes()[: good.stat().st_size // 2], "truncated JPEG")
    put("cut_in_header.jpg", good.read_bytes()[:300], "unreadable image header")
    put("text.jpg", b"just some notes, not a picture\n" * 5, "not an image")
    put("page.png", b"<!DOCTYPE html><html><body>404 not found</body></html>", "not an image")
    put("bomb.png", _png_header_only(50_000, 50_000), "decompression bomb")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    put("animated.jpg", lambda p: frames[0].save(p, "GIF", save_all=True, append_images=frames[1:]), "content is GIF")
    corrupt = bytearray(cv2.imencode(".png", rgb)[1].tobytes())
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 40] = b"\x00" * 40
    put("corrupt_data.png", bytes(corrupt), "corrupt")
    put("gray16.png", lambda p: cv2.imwrite(str(p), (rgb[..., 0].astype(np.uint16) * 257)))
    put("rgb16.png", lambda p: cv2.imwrite(str(p), rgb.astype(np.uint16) * 257))
    put("gray.jpg", lambda p: Image.fromarray(rgb[..., 0]).save(p))
    put("rgba.png", lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p))
    put("palette.png", lambda p: Image.fromarray(rgb).convert("P").save(p))
    put("cmyk.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p, "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", _jpeg(rgb, exif=exif.tobytes()))
    put("one_pixel.png", lambda p: Image.new("RGB", (1, 1), (120, 80, 60)).save(p))
    put("extreme_aspect.png", lambda p: Image.fromarray(np.repeat(rgb[:3], 30, axis=1)).save(p))
    put("multipage.tif", lambda p: Image.fromarray(rgb).save(p, save_all=True, append_images=[Image.fromarray(rgb)]))
    put("image.bmp", lambda p: Image.fromarray(rgb).save(p))
    put("upper.JPEG", _jpeg(rgb))
    put("jpeg_named.png", _jpeg(rgb))
    put("with spaces.jpg", _jpeg(rgb))
    put("ünïcødé-läsion.jpg", _jpeg(rgb))
    put("-leading-dash.jpg", _jpeg(rgb))
    put("large_photo.jpg", lambda p: cv2.imwrite(str(p), cv2.resize(rgb, (4000, 3000))))
    put("sub/deeper/nested.png", lambda p: Image.fromarray(rgb).save(p))
    (folder / "folder_named_like.jpg").mkdir()  # a directory, not an input
    os.symlink(folder / "sub", folder / "sub" / "loop")  # a symlink loop
    os.symlink(good, folder / "link_to_good.jpg")
    expected["link_to_good.jpg"] = None
    (folder / "notes.txt").write_text("ignored: not an image name")
    (folder / "empty_folder").mkdir()
    return expected


def test_corpus_each_good_image_processed_each_bad_one_explained(tiny_bundle, tmp_path, capsys):
    folder = tmp_path / "corpus"
    expected = build_corpus(folder)
    assert len(expected) >= 25
    out = tmp_path / "out" / "r.csv"
    code = main(["run", str(folder), "--out", str(out), "--model", str(tiny_bundle.path), "--masks",
                 str(tmp_path / "masks"), "--annotate", str(tmp_path / "ann"), "-b", "4", "--tta", "none"])
    assert code == 3
    err = capsys.readouterr().err
    results = {r["image"] for r in csv.DictReader(open(out, encoding="utf-8"))}
    details = {r["image"]: r for r in csv.DictReader(open(tmp_path / "out" / "r_details.csv", encoding="utf-8"))}
    for name, reason in expected.items():
        image_id = os.path.splitext(os.path.basename(name))[0]
        if reason is None:
            assert image_id in results, name
            assert details[image_id]["status"] == "ok"
            mask = cv2.imread(str(tmp_path / "masks" / f"{image_id}_segmentation.png"), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.ndim == 2
        else:
            assert image_id not in results, name
            assert details[image_id]["status"] == "error" and reason in details[image_id]["error"], name
            lines = [line for line in err.splitlines() if f"{name.split('/')[-1]}:" in line]
            assert len(lines) == 1 and reason in lines[0], name
    rotated = cv2.imread(str(tmp_path / "masks" / "rotated_segmentation.png"), cv2.IMREAD_UNCHANGED)
    assert rotated.shape == (80, 60)  # EXIF orientation 6: displayed portrait
    assert not list((tmp_path / "masks").glob(".*.tmp")) and not list((tmp_path / "ann").glob(".*.tmp"))


def test_file_deleted_between_listing_and_reading(tiny_bundle, tmp_path):
    from dermbatch.inputs import discover_inputs
    from dermbatch.predictor import Predictor

    for i in range(3):
        synthetic_lesion(tmp_path / f"x{i}.jpg", seed=i)
    items = discover_inputs([tmp_path])
    (tmp_path / "x1.jpg").unlink()
    with Predictor(tiny_bundle.path, tta="none", workers=2) as predictor:
        results = list(predictor.predict(items))
    assert [r.ok for r in results] == [True, False, True]
    assert "disappeared" in results[1].error


def test_empty_folder_and_folder_without_images_are_usage_errors(tiny_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    for folder in ("empty", "texts"):
        assert main(["run", str(tmp_path / folder), "--out", str(tmp_path / "r.csv"), "--model",
                     str(tiny_bundle.path)]) == 2
        assert "no images found" in capsys.readouterr().err


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dermbatch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_kill_9_then_resume_gives_every_image_exactly_once(tiny_bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        synthetic_lesion(folder / f"img_{i:02d}.jpg", seed=i)
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    args = ["run", folder, "--out", out, "--model", tiny_bundle.path, "--masks", masks, "-b", "2", "--workers", "1",
            "--tta", "flip", "-q"]
    proc = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n") - 1
    assert 3 < partial < 30, "the kill must land in the middle of the run"
    resumed = _cli(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    text = out.read_text()
    assert text.endswith("\n")
    rows = list(csv.reader(io.StringIO(text)))
    ids = [r[0] for r in rows[1:]]
    assert sorted(ids) == [f"img_{i:02d}" for i in range(30)] and len(ids) == 30
    assert all(len(r) == 8 for r in rows)
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{i}_segmentation.png" for i in ids)
    details = list(csv.DictReader(open(tmp_path / "r_details.csv")))
    assert sorted(d["image"] for d in details) == sorted(ids)


def test_output_failure_stops_with_one_error_and_keeps_written_rows(tiny_bundle, tmp_path):
    import resource

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        synthetic_lesion(folder / f"img_{i:02d}.jpg", seed=i)
    out = tmp_path / "r.csv"

    def limit_file_size():  # a full disk, as the run sees it: no file may grow past 1000 bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    proc = _cli("run", folder, "--out", out, "--model", tiny_bundle.path, "-b", "2", "--tta", "none", "-q",
                preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "File too large" in lines[0]
    rows = list(csv.reader(open(out)))
    assert rows[0][0] == "image" and all(len(r) == 8 for r in rows)


def test_second_run_on_the_same_output_is_refused(tiny_bundle, tmp_path, capsys):
    synthetic_lesion(tmp_path / "a.jpg")
    out = tmp_path / "r.csv"
    with RunLock(out):
        code = main(["run", str(tmp_path / "a.jpg"), "--out", str(out), "--model", str(tiny_bundle.path)])
    assert code == 1
    assert "another dermbatch run is writing" in capsys.readouterr().err
    assert not out.exists()


def test_pickled_checkpoint_is_refused_not_executed(tmp_path):
    import pickle

    from dermbatch.errors import UsageError
    from trainer.pretrained import _read_state

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    with pytest.raises(UsageError, match="never unpickled"):
        _read_state(path)
    assert not (tmp_path / "pwned").exists()
