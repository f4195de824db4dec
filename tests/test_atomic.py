"""esc_sr.atomic, the one atomic writer, and the writers built on it: file modes under the umask, no torn files.

Every writer must give its file the mode a plain ``open(path, "w")`` would (``0o666 & ~umask``), not mkstemp's 0600,
and a failure inside the write must leave the previous file and no temporary file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import esc_arch
import esc_sr
from basicsr_plugin.checkpoint_io import atomic_torch_save, atomic_write_text
from esc_sr import atomic
from esc_sr import images

UMASKS = [0o022, 0o077]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under this umask; the previous one is restored afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    target = tmp_path / "sub" / "out.bin"  # the folder is created
    with atomic.atomic_write(target) as temp:
        assert temp.parent == target.parent and temp.name.startswith(atomic.TEMP_PREFIX) and temp.suffix == ".bin"
        temp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert _mode(target) == 0o666 & ~umask
    assert _only(target.parent) == ["out.bin"]


def test_write_bytes_and_write_text_give_the_umask_mode(tmp_path, umask):
    atomic.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic.write_text(tmp_path / "b.txt", "héllo\n", suffix=".tmp")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.txt") == 0o666 & ~umask


def test_suffix_option_names_the_temporary_file(tmp_path):
    with atomic.atomic_write(tmp_path / "hook.pth", suffix=".tmp") as temp:
        assert temp.suffix == ".tmp" and temp.name.startswith(atomic.TEMP_PREFIX)
        temp.write_text("import x\n")
    assert _only(tmp_path) == ["hook.pth"]


def test_image_gets_the_umask_mode(tmp_path, umask):
    target = tmp_path / "photo.png"
    images.write_image(target, np.zeros((8, 8, 3), np.uint8))
    assert _mode(target) == 0o666 & ~umask
    assert images.TEMP_PREFIX == atomic.TEMP_PREFIX
    assert _only(tmp_path) == ["photo.png"]


def test_save_model_gets_the_umask_mode(tmp_path, umask):
    target = esc_sr.save_model(esc_arch.esc_tiny(scale=2), tmp_path / "tiny.safetensors")
    assert _mode(target) == 0o666 & ~umask
    assert esc_arch.load_model(target).scale == 2
    assert _only(tmp_path) == ["tiny.safetensors"]


def test_basicsr_checkpoint_and_text_get_the_umask_mode(tmp_path, umask):
    atomic_torch_save({"params": {"w": torch.ones(2)}}, str(tmp_path / "net_g_5.pth"))
    atomic_write_text(str(tmp_path / "best.json"), "{}\n")
    assert torch.load(tmp_path / "net_g_5.pth", weights_only=True)["params"]["w"].tolist() == [1.0, 1.0]
    assert _mode(tmp_path / "net_g_5.pth") == _mode(tmp_path / "best.json") == 0o666 & ~umask
    assert _only(tmp_path) == ["best.json", "net_g_5.pth"]


def test_failure_inside_the_block_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.atomic_write(target) as temp:
            temp.write_bytes(b"half of the new")
            seen.append(temp)
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert not seen[0].exists()
    assert _only(tmp_path) == ["out.bin"]


def test_interrupt_into_a_new_name_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(tmp_path / "new.bin") as temp:
            temp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert _only(tmp_path) == []


def test_failed_fsync_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def no_space(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old"
    assert _only(tmp_path) == ["out.txt"]


def test_failing_torch_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "5.state"
    atomic_torch_save({"iter": 4}, str(target))
    with pytest.raises(Exception):
        atomic_torch_save({"iter": 5, "bad": lambda: None}, str(target))  # a lambda cannot be pickled
    assert torch.load(target, weights_only=True) == {"iter": 4}
    assert _only(tmp_path) == ["5.state"]


# ------------------------------------------------------------------------ failures name the target (issue 26)

NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _full_disk_safetensors(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk: part of the file written, then its own error around the OS's."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 100)
    raise SafetensorError(NO_SPACE)


def _full_disk_plain(temp: Path) -> None:
    with open(temp, "wb") as handle:
        handle.write(b"partial")
    raise OSError(28, "No space left on device")  # as Python's write reports it: no file name


@pytest.mark.parametrize("writer", ["save_model", "plain"])
def test_a_full_disk_names_the_target_and_the_reason(tmp_path, monkeypatch, writer):
    """Issue 26: `esc-sr convert` onto a full disk was an "internal error: SafetensorError", `export-onnx` a bare
    "[Errno 28]". Whatever wraps the OS error, the write fails with an OSError about the target, never the
    temporary file, and leaves nothing behind."""
    import safetensors.torch

    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError) as caught:
        if writer == "save_model":
            monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_safetensors)
            esc_sr.save_model(esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1), target)
        else:
            with atomic.atomic_write(target) as temp:
                _full_disk_plain(temp)
    error = caught.value
    assert (error.filename, error.errno, error.strerror) == (str(target), 28, "No space left on device")
    assert _only(tmp_path) == []


def test_a_folder_at_the_target_is_named_as_the_target(tmp_path):
    """Issue 26: `convert --overwrite` onto a folder named x.safetensors named the temporary file."""
    target = tmp_path / "x.safetensors"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        atomic.write_text(target, "new")
    assert (caught.value.filename, caught.value.strerror) == (str(target), "is a directory, not a file")
    assert _only(tmp_path) == ["x.safetensors"] and _only(target) == []


@pytest.mark.parametrize("depth", [1, 2], ids=["parent", "grandparent"])
def test_a_file_where_a_folder_should_be_is_not_a_directory(tmp_path, depth):
    """Issue 26: an output under a regular file said "File exists"."""
    blocker = tmp_path / "a.png"
    blocker.write_text("an image, not a folder")
    target = blocker / "sub" / "out.png" if depth == 2 else blocker / "out.png"
    with pytest.raises(NotADirectoryError) as caught:
        atomic.write_text(target, "new")
    assert caught.value.filename == str(target)
    assert caught.value.strerror == f"{blocker} is a file, not a directory"
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        atomic.ensure_folder(target.parent)


def test_a_network_error_inside_a_download_is_left_to_the_downloader(tmp_path):
    """Only the file system's errors are renamed: a download's URLError or reset connection keeps its own type."""
    import urllib.error

    for error in (urllib.error.URLError("offline"), ConnectionResetError(104, "Connection reset by peer")):
        with pytest.raises(type(error)) as caught:
            with atomic.atomic_write(tmp_path / "weights.pth"):
                raise error
        assert caught.value is error
    assert _only(tmp_path) == []
