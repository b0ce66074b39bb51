"""An output that another process writes while a command runs is never replaced without
``--overwrite``: the checks before the work cannot see it, so the final move refuses the name
(merge_backend/file_sinks.py, ``move_into_place``). The other process is played here by the
command's own progress callback, which writes the output's name mid-run."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from merge_backend.atomic_files import atomic_folder, atomic_path, atomic_write_text
from merge_backend.export.jobs import ExportItem, plan_exports, run_exports
from merge_backend.file_sinks import AtomicWriter
from merge_backend.lora.extract import extract_lora
from merge_backend.merge_file import merge_to_file
from merge_backend.recipe import Recipe, Source

THEIRS = b"another process wrote this\n"


def appear(path, kind: str = "file") -> None:
    """What the other process leaves at ``path``: a file, a folder holding a file, or a link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_bytes(THEIRS)
    elif kind == "folder":
        path.mkdir()
        (path / "mine.txt").write_bytes(THEIRS)
    else:
        os.symlink("elsewhere", path)


def still_theirs(path, kind: str = "file") -> bool:
    if kind == "file":
        return path.read_bytes() == THEIRS
    if kind == "folder":
        return os.listdir(path) == ["mine.txt"] and (path / "mine.txt").read_bytes() == THEIRS
    return os.readlink(path) == "elsewhere"


def refused(excinfo, path) -> bool:
    exc = excinfo.value
    return (exc.errno == errno.EEXIST and exc.filename == str(path)
            and "--overwrite" in exc.strerror)


def write_text(path, replace, during=lambda: None):
    during()  # the text is built before the writer opens anything
    atomic_write_text(path, "mine", replace)


def write_by_name(path, replace, during=lambda: None):
    with atomic_path(path, replace=replace) as tmp:
        tmp.write_text("mine")
        during()


def write_streamed(path, replace, during=lambda: None):
    with AtomicWriter(path, direct=True, replace=replace) as sink:
        sink.write(b"mine")
        during()


def write_folder(path, replace, during=lambda: None):
    with atomic_folder(path, replace=replace) as tmp:
        (tmp / "model_index.json").write_text("{}")
        during()


WRITERS = [write_text, write_by_name, write_streamed, write_folder]


@pytest.mark.parametrize("kind", ["file", "folder", "link"])
@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_a_name_taken_mid_write_is_kept_and_nothing_of_ours_is_left(writer, kind, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError) as excinfo:
        writer(target, False, lambda: appear(target, kind))
    assert refused(excinfo, target)
    assert still_theirs(target, kind)
    assert os.listdir(tmp_path) == ["out"]  # no temporary file or folder of ours


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_without_a_race_the_output_lands_and_replace_still_replaces(writer, tmp_path):
    target = tmp_path / "out"
    writer(target, False)
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(FileExistsError):
        writer(target, False)  # it exists now: only --overwrite may replace it
    writer(target, True)
    assert os.listdir(tmp_path) == ["out"]
    got = (target / "model_index.json") if target.is_dir() else target
    assert got.read_bytes() == (b"{}" if writer is write_folder else b"mine")


def merge_recipe(fam) -> Recipe:
    return Recipe(arch=fam.arch, method="weighted_sum", vocabulary="single", ratios={"all": 0.3},
                  models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))})


def taking(path, kind: str = "file"):
    """A progress callback that takes ``path`` the first time it is called."""
    def progress(*_):
        if not os.path.lexists(path):
            appear(path, kind)
    return progress


def test_two_merges_to_one_output_the_later_fails_and_keeps_the_first(tiny_sd1, tmp_path):
    out = tmp_path / "merged.safetensors"
    with pytest.raises(FileExistsError) as excinfo:
        merge_to_file(merge_recipe(tiny_sd1), out, progress=taking(out))
    assert refused(excinfo, out) and still_theirs(out)
    assert os.listdir(tmp_path) == ["merged.safetensors"]
    # with --overwrite the merge replaces it: the mid-run file is the user's choice to lose
    merge_to_file(merge_recipe(tiny_sd1), out, overwrite=True, progress=taking(out))
    a, b = load_file(tiny_sd1.a), load_file(tiny_sd1.b)
    key = next(k for k in load_file(out) if k.startswith("model.diffusion_model."))
    # ComfyUI's ModelMergeSimple: ratio is model1's share
    expected = (0.3 * a[key].float() + 0.7 * b[key].float()).half()
    assert torch.equal(load_file(out)[key], expected)


def test_a_lora_extracted_onto_a_name_taken_mid_run_keeps_it(tiny_sd1, tmp_path):
    out = tmp_path / "a.safetensors"
    with pytest.raises(FileExistsError) as excinfo:
        extract_lora(tiny_sd1.a, tiny_sd1.base, out, rank=4, progress=taking(out))
    assert refused(excinfo, out) and still_theirs(out)
    assert os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("fmt,kind", [("checkpoint", "file"), ("diffusers", "folder"),
                                      ("comfyui", "file"), ("mbw", "file")])
def test_an_export_never_replaces_an_output_made_while_it_ran(tiny_sd1, tmp_path, fmt, kind):
    item = ExportItem(merge_recipe(tiny_sd1), "best", "best")
    plan = plan_exports([item], [fmt], tmp_path / "out")
    path = plan.outputs[0].paths[0]
    # (a checkpoint's merge checks its output again as it starts: an earlier refusal, as good)
    with pytest.raises((FileExistsError, ValueError)) as excinfo:
        run_exports(plan, progress=lambda out: appear(out.paths[0], kind))
    assert f"{path} exists" in str(excinfo.value) if fmt == "checkpoint" else refused(excinfo, path)
    assert still_theirs(path, kind)
    assert os.listdir(tmp_path / "out") == [path.name]
