import csv

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


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "..\\x"])
def test_output_path_refuses_ids_that_escape(tmp_path, bad):
    with pytest.raises(OutputError):
        output_path(tmp_path, bad, ".png")


def test_output_path_keeps_unicode_and_spaces(tmp_path):
    assert output_path(tmp_path, "läsion 1 -x", "_segmentation.png").parent == tmp_path
