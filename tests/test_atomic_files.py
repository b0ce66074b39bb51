"""merge_backend.atomic_files: an output is the old file or the new one, never half of one, and
no temporary name outlives the writer (a killed writer's: tests/test_crash_merge.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from merge_backend.atomic_files import atomic_folder, atomic_path, atomic_write_text, scratch_folder


class Boom(Exception):
    pass


def test_a_library_writing_by_name_replaces_the_target_whole(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name != target.name
        assert target.read_bytes() == b"old"  # nothing is visible before the block ends
        torch.save({"w": torch.arange(3)}, tmp)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_a_failed_write_leaves_the_old_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "world.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["world.safetensors"]
    with pytest.raises(Boom), atomic_path(tmp_path / "new.txt"):
        raise Boom  # nothing was written at all
    assert sorted(os.listdir(tmp_path)) == ["sub"]


def test_text_lands_whole_in_a_folder_made_for_it(tmp_path):
    target = tmp_path / "a" / "b" / "run.json"
    atomic_write_text(target, "{\"x\": 1}\n")
    assert target.read_text() == "{\"x\": 1}\n"
    assert os.listdir(target.parent) == ["run.json"]


def test_a_scratch_folder_is_gone_however_its_block_ends(tmp_path):
    out = tmp_path / "best.lora.safetensors"
    with scratch_folder(out) as scratch:
        assert scratch.is_dir() and scratch.parent == tmp_path and not any(scratch.iterdir())
        (scratch / "merged.safetensors").write_bytes(b"x" * 1000)
    with pytest.raises(Boom), scratch_folder(out) as scratch:
        (scratch / "merged.safetensors").write_bytes(b"x")
        raise Boom
    assert os.listdir(tmp_path) == []


def _killed_at(moment: str, target) -> int:
    """Run a writer that replaces the folder ``target`` (with one file, new.txt), SIGKILL it at
    ``moment``; its PID."""
    code = ("import sys; from pathlib import Path; "
            "from merge_backend.atomic_files import atomic_folder\n"
            "with atomic_folder(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'new.txt').write_text('new')\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stderr=subprocess.PIPE,
                              env={**os.environ, "MERGESEARCH_PAUSE_AT": moment}, text=True)
    try:
        assert f"paused at {moment}" in writer.stderr.readline()
    finally:
        writer.kill()
        writer.wait()
        writer.stderr.close()
    return writer.pid


def _old_output(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    return target


def test_a_writer_killed_while_deleting_the_replaced_folder_leaves_it_to_the_next(tmp_path):
    """The folder an atomic_folder replaces is deleted after the new one is in place; a writer
    killed then leaves it under a partial name (its PID, start time and host), which the next
    writer into that folder removes, and the new folder stands whole."""
    target = _old_output(tmp_path)
    pid = _killed_at("removing-replaced", target)
    assert os.listdir(target) == ["new.txt"]
    left = sorted(set(os.listdir(tmp_path)) - {"export"})
    assert len(left) == 1 and re.fullmatch(rf"\.export\.old\.{pid}-[0-9]+@.+\.partial",
                                           left[0]), left
    assert os.listdir(tmp_path / left[0]) == ["old.txt"]
    with atomic_folder(tmp_path / "other") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["export", "other"]


def test_a_writer_killed_between_its_two_renames_gets_the_old_folder_put_back(tmp_path):
    """Killed after setting the old folder aside but before the new one took its name: the next
    writer into that folder puts the old one back (and removes the unfinished new one)."""
    target = _old_output(tmp_path)
    _killed_at("between-renames", target)
    assert not target.exists()
    with atomic_folder(tmp_path / "other") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["export", "other"]
    assert os.listdir(target) == ["old.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_a_library_writes_follow_the_umask(tmp_path, mask):
    """safetensors' save_file makes 0600 files: a tiny family or an exported diffusers folder
    could not be read by another user or service, while merges beside them were 0644."""
    from safetensors.torch import save_file

    previous = os.umask(mask)
    try:
        with atomic_path(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        with atomic_folder(tmp_path / "pipe") as tmp:
            (tmp / "unet").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "unet" / "model.safetensors"))
    finally:
        os.umask(previous)
    for path, full in [("m.safetensors", 0o666), ("pipe/unet/model.safetensors", 0o666),
                       ("pipe/unet", 0o777), ("pipe", 0o777)]:
        assert (tmp_path / path).stat().st_mode & 0o777 == full & ~mask, path
