import os

import pytest

from dermbatch.errors import UsageError
from dermbatch.inputs import discover_inputs


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folders_are_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.TIFF", "sub/deeper/d.jpeg", "notes.txt", ".hidden.jpg", "e.bmp"]:
        _touch(tmp_path / name)
    items = discover_inputs([tmp_path])
    assert [i.image_id for i in items] == ["a", "b", "e", "c", "d"]
    assert [i.image_id for i in discover_inputs([tmp_path], recursive=False)] == ["a", "b", "e"]


def test_duplicate_ids_name_both_files(tmp_path):
    first, second = _touch(tmp_path / "x" / "ISIC_1.jpg"), _touch(tmp_path / "y" / "ISIC_1.png")
    with pytest.raises(UsageError, match="ISIC_1") as info:
        discover_inputs([tmp_path])
    assert str(first) in str(info.value) and str(second) in str(info.value)


def test_same_file_given_twice_is_not_a_duplicate(tmp_path):
    f = _touch(tmp_path / "a.jpg")
    assert len(discover_inputs([f, tmp_path])) == 1


def test_missing_path_non_image_file_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        discover_inputs([tmp_path / "nope"])
    with pytest.raises(UsageError, match="not an image file name"):
        discover_inputs([_touch(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        discover_inputs([tmp_path / "empty"])


def test_symlink_loop_terminates_and_directory_named_like_image_is_skipped(tmp_path):
    _touch(tmp_path / "a" / "one.jpg")
    (tmp_path / "a" / "dir.jpg").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    items = discover_inputs([tmp_path])
    assert [i.image_id for i in items] == ["one"]
