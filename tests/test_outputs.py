import csv
import re

import pytest

from dermbatch.errors import OutputError
from dermbatch.outputs import CsvAppender, RunLock, output_path, read_complete_rows


def test_appender_writes_header_kept_rows_and_batches(tmp_path):
    path = tmp_path / "r.csv"
    writer = CsvAppender(path, ("image", "a"), keep=[{"image": "x", "a": "1"}])
    writer.append([["y", "2"], ["z, with comma", "3"]])
    writer.close()
    rows = list(csv.reader(path.open()))
    assert rows == [["image", "a"], ["x", "1"], ["y", "2"], ["z, with comma", "3"]]


def test_read_complete_rows_ignores_a_partial_last_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("image,a\nx,1\ny,2\nz,0.12")
    assert [r["image"] for r in read_complete_rows(path)] == ["x", "y"]


def test_write_to_full_disk_is_an_output_error(tmp_path):
    writer = CsvAppender(tmp_path / "r.csv", ("image",))
    writer._fh = open("/dev/full", "w")
    with pytest.raises(OutputError, match="No space left"):
        writer.append([["x"]])


def test_second_lock_on_same_output_is_refused(tmp_path):
    out = tmp_path / "r.csv"
    with RunLock(out):
        with pytest.raises(OutputError, match="another dermbatch run is writing"):
            with RunLock(out):
                pass
    with RunLock(out):  # released
        pass


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "..\\x", "../../etc/passwd", "x\ny", "\udcff\udcfe", "a:b"])
def test_output_path_of_an_unsafe_id_stays_in_the_folder_under_a_hashed_stem(tmp_path, bad):
    path = output_path(tmp_path, bad, "_segmentation.png")
    assert path.parent == tmp_path
    assert path.name.endswith("_segmentation.png") and "/" not in path.name and "\\" not in path.name
    assert re.search(r"~[0-9a-f]{16}_segmentation\.png$", path.name)
    path.write_bytes(b"x")  # the file system takes the name


def test_output_path_keeps_unicode_and_spaces(tmp_path):
    assert output_path(tmp_path, "läsion 1 -x", "_segmentation.png") == tmp_path / "läsion 1 -x_segmentation.png"


def test_read_complete_rows_cut_inside_a_quoted_id_with_a_newline(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('image,a\nx,1\n"two\nlines",2\n"cut\n')
    assert [r["image"] for r in read_complete_rows(path)] == ["x", "two\nlines"]
    path.write_text('image,a\nx,1\n"bad"y,2\nz,3\n')  # damage in the middle is not an interrupted write
    with pytest.raises(OutputError, match="cannot resume"):
        read_complete_rows(path)
