"""core/files.py: bounded reads refuse by type before reading and by size at limit+1 bytes; a
temporary is an orphan only when the process named in it is gone (or is this one)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tripletctl.core.files import FileRefused, check_regular, orphaned, read_bytes, read_lines, read_text


def test_a_file_up_to_the_limit_is_read_and_one_byte_more_is_refused(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"x" * 100)
    assert read_bytes(path, 100) == b"x" * 100
    with pytest.raises(FileRefused, match=f"{path} is larger than 99 bytes: refused"):
        read_bytes(path, 99)


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket", "device"])
def test_non_regular_files_are_refused_by_type_without_blocking(tmp_path, kind):
    path = tmp_path / "thing"
    words = {"directory": "a directory", "fifo": "a FIFO", "socket": "a socket", "device": "a character device"}
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = "/dev/zero"
    for read in (lambda p: read_bytes(p, 10), lambda p: list(read_lines(p)), check_regular):
        with pytest.raises(FileRefused, match=f"is {words[kind]}"):
            read(path)


def test_lines_are_bounded_one_by_one_and_the_file_is_not(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"abcd\n" * 1000 + b"1234")  # 5,004 bytes in lines of at most 4 bytes
    assert list(read_lines(path, line_limit=4)) == ["abcd"] * 1000 + ["1234"]
    path.write_bytes(b"abcd\nabcde\n")
    with pytest.raises(FileRefused, match="line 2 is longer than 4 bytes"):
        list(read_lines(path, line_limit=4))


def test_read_text_decodes_strictly_unless_told(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"ok \xff")
    with pytest.raises(UnicodeDecodeError):
        read_text(path, 10)
    assert read_text(path, 10, errors="replace") == "ok \ufffd"


def test_only_a_gone_process_leaves_orphans(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        assert not orphaned(tmp_path / f"run.json.tmp-{live.pid}")
        assert not orphaned(tmp_path / f"checkpoint.trash-{live.pid}-123456")
        assert orphaned(tmp_path / f"checkpoint.tmp-{gone.pid}")
        assert orphaned(tmp_path / f"checkpoint.trash-{gone.pid}-123456")
        assert orphaned(tmp_path / f"summary.json.tmp-{os.getpid()}")  # an earlier process with our pid
        assert not orphaned(tmp_path / "notes.tmp-draft")  # not a tripletctl temporary
    finally:
        live.kill()
        live.wait()
