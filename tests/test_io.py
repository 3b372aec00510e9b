import os

import pytest

from focas_keras import io as fio
from focas_keras.errors import InputError


def _names(path):
    return sorted(p.name for p in path.iterdir())


def test_atomic_output_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="not empty"):
        with fio.atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with fio.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert _names(out) == ["old.txt"] and _names(tmp_path) == ["out"]
    with fio.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(out) == ["new.txt"] and _names(tmp_path) == ["out"]


def test_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(fio.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with fio.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _names(out) == ["old.txt"] and _names(tmp_path) == ["out"]
