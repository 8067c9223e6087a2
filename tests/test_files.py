"""files.py: atomic writes, the one-line advice for a failed write, and the lock for work done once."""
import errno
import logging
import threading
import time

import pytest

from protege.errors import StorageError
from protege.files import exclusive, write_atomic, write_fix


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free space"), (errno.EFBIG, "ulimit -f"), (errno.EACCES, "writable"),
                                         (errno.EROFS, "read-only"), (errno.ENOENT, "does not exist")])
def test_write_fix_names_what_to_do(tmp_path, code, words):
    assert words in write_fix(OSError(code, "x"), tmp_path / "f.json")


def test_a_write_into_a_missing_folder_says_so_and_leaves_nothing(tmp_path):
    with pytest.raises(StorageError, match="does not exist") as e:
        write_atomic(tmp_path / "missing" / "f.json", "{}")
    assert "\n" not in str(e.value) and not (tmp_path / "missing").exists()


def test_exclusive_makes_a_second_holder_wait_and_says_why(tmp_path, caplog):
    lock, order = tmp_path / "sub" / "work.lock", []

    def second():
        with exclusive(lock, "waiting for the first"):
            order.append("second")

    with caplog.at_level(logging.INFO, logger="protege.files"):
        with exclusive(lock):  # (its folder is made)
            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 60
            while "waiting for the first" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "waiting for the first" in caplog.text and t.is_alive()  # it found the lock held, and waits
            order.append("first")
        t.join(timeout=60)
    assert order == ["first", "second"]
