"""files.py: atomic writes and the one-line advice for a failed write."""
import errno

import pytest

from protege.errors import StorageError
from protege.files import write_atomic, write_fix


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free space"), (errno.EFBIG, "ulimit -f"), (errno.EACCES, "writable"),
                                         (errno.EROFS, "read-only"), (errno.ENOENT, "does not exist")])
def test_write_fix_names_what_to_do(tmp_path, code, words):
    assert words in write_fix(OSError(code, "x"), tmp_path / "f.json")


def test_a_write_into_a_missing_folder_says_so_and_leaves_nothing(tmp_path):
    with pytest.raises(StorageError, match="does not exist") as e:
        write_atomic(tmp_path / "missing" / "f.json", "{}")
    assert "\n" not in str(e.value) and not (tmp_path / "missing").exists()
