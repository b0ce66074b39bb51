"""SIGKILL a `mergesearch merge` at named moments: the output is absent or complete and valid,
and the next merge into that folder leaves no stale partial file behind.

The moments come from the one test hook, ``MERGESEARCH_PAUSE_AT`` (merge_backend/partial_files.py):
the merge prints that it paused and sleeps until it is killed.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from child_signals import interruptible
from safetensors.torch import load_file

from merge_backend.recipe import Recipe, Source, uniform_ratios

RATIO = 0.3


def merge_cmd(fam, out: Path) -> list[str]:
    return [sys.executable, "-m", "search.cli", "merge", "simple", str(fam.a), str(fam.b),
            "--ratio", str(RATIO), "--quiet", "-o", str(out)]


def start(fam, out: Path, moment: str | None = None,
          cmd: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("MERGESEARCH_PAUSE_AT", None)
    if moment:
        env["MERGESEARCH_PAUSE_AT"] = moment
    return subprocess.Popen(cmd or merge_cmd(fam, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, preexec_fn=interruptible)


def wait_paused(proc: subprocess.Popen, moment: str, timeout: float = 120) -> None:
    """Read the child's stderr until it says it paused at ``moment``."""
    seen, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while f"paused at {moment}".encode() not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"the merge never paused at {moment}: {seen.decode()[-2000:]}")
            if sel.select(timeout=left):
                seen += os.read(proc.stderr.fileno(), 65536)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its PID is dead now
    proc.stderr.close()


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the process's start time in clock ticks since boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))


def merge_ok(fam, out: Path) -> None:
    proc = subprocess.run(merge_cmd(fam, out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def assert_valid(out: Path, fam) -> None:
    """A complete merge: it loads (the safetensors crate checks the layout) and every UNet
    tensor is ComfyUI's ModelMergeSimple, w = r·W1 + (1-r)·W2 in float32 cast to fp16."""
    merged, a, b = load_file(out), load_file(fam.a), load_file(fam.b)
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert unet and all(k in merged for k in unet)
    for key in unet:
        w = a[key].float() * RATIO
        w += (1 - RATIO) * b[key].float()
        assert torch.equal(merged[key], w.half()), key


def sources_digest(fam) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (fam.a, fam.b)}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("moment", ["mid-stream", "before-rename"])
def test_killed_while_writing_leaves_no_output_and_the_next_merge_cleans_up(
        tiny_sd1, tmp_path, moment):
    before = sources_digest(tiny_sd1)
    out = tmp_path / "merged.safetensors"
    proc = start(tiny_sd1, out, moment)
    wait_paused(proc, moment)
    ticks = start_ticks(proc.pid)
    kill(proc)
    assert not out.exists()
    [partial] = partials(tmp_path)  # what a killed writer cannot clean up
    assert partial.name.startswith(f".merged.safetensors.{proc.pid}-{ticks}@")
    if moment == "before-rename":  # complete and synced, only the rename was missing
        assert_valid(partial, tiny_sd1)
    merge_ok(tiny_sd1, tmp_path / "next.safetensors")
    assert partials(tmp_path) == []
    assert not out.exists()
    assert_valid(tmp_path / "next.safetensors", tiny_sd1)
    assert sources_digest(tiny_sd1) == before


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("fmt,left", [("diffusers", "my-merge-diffusers"),
                                      ("lora", "my-merge.lora.safetensors.scratch")])
def test_a_killed_export_leaves_no_folder_behind(tiny_sd1, tmp_path, fmt, left):
    """A diffusers export builds its folder under a temporary name, a LoRA export merges into a
    scratch folder: killed, that folder is a partial like a merge's file, named by writer and
    host, and the next writer into the folder removes it."""
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw",
                    ratios=uniform_ratios("sd1", "mbw", RATIO),
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    recipe_file = tmp_path / "my-merge.json"
    recipe_file.write_text(recipe.to_json())
    out = tmp_path / "out"
    proc = start(tiny_sd1, out, "mid-stream", cmd=[
        sys.executable, "-m", "search.cli", "export", str(recipe_file), "--to", fmt, "-o",
        str(out), "--config-folder", str(tiny_sd1.config_folder), "--base", str(tiny_sd1.base),
        "--quiet"])
    wait_paused(proc, "mid-stream")  # writing the merged checkpoint inside that folder
    ticks = start_ticks(proc.pid)
    kill(proc)
    [partial] = partials(out)
    assert partial.is_dir()
    assert partial.name.startswith(f".{left}.{proc.pid}-{ticks}@")
    assert [p.name for p in out.iterdir()] == [partial.name]  # no output
    merge_ok(tiny_sd1, out / "next.safetensors")
    assert partials(out) == []
    assert_valid(out / "next.safetensors", tiny_sd1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_while_writing_removes_its_own_partial(tiny_sd1, tmp_path, sig):
    """Ctrl-C or SIGTERM (`kill`, docker stop) mid-write: the merge removes its partial file
    itself and exits 130; nothing is left for the next writer to clean."""
    out = tmp_path / "merged.safetensors"
    proc = start(tiny_sd1, out, "mid-stream")
    wait_paused(proc, "mid-stream")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err and "mergesearch: interrupted" in err
    assert os.listdir(tmp_path) == []


def test_killed_after_the_rename_leaves_a_complete_output(tiny_sd1, tmp_path):
    out = tmp_path / "merged.safetensors"
    proc = start(tiny_sd1, out, "after-rename")
    wait_paused(proc, "after-rename")
    kill(proc)
    assert partials(tmp_path) == []
    assert_valid(out, tiny_sd1)


def test_killed_during_start_up(tiny_sd1, tmp_path):
    before = sources_digest(tiny_sd1)
    out = tmp_path / "merged.safetensors"
    proc = start(tiny_sd1, out)
    time.sleep(0.3)  # the interpreter is still importing torch
    kill(proc)
    assert os.listdir(tmp_path) == []
    merge_ok(tiny_sd1, out)
    assert_valid(out, tiny_sd1)
    assert partials(tmp_path) == [] and sources_digest(tiny_sd1) == before


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_live_writers_partial_is_kept(tiny_sd1, tmp_path):
    slow = start(tiny_sd1, tmp_path / "slow.safetensors", "mid-stream")
    try:
        wait_paused(slow, "mid-stream")
        [mine] = partials(tmp_path)
        merge_ok(tiny_sd1, tmp_path / "other.safetensors")
        assert partials(tmp_path) == [mine]  # its writer is alive: not stale
    finally:
        kill(slow)
    merge_ok(tiny_sd1, tmp_path / "third.safetensors")
    assert partials(tmp_path) == []


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_only_our_stale_partials_of_this_host_are_removed(tiny_sd1, tmp_path):
    # Learn this host's tag from a partial a killed merge left behind.
    proc = start(tiny_sd1, tmp_path / "probe.safetensors", "mid-stream")
    wait_paused(proc, "mid-stream")
    kill(proc)
    [probe] = partials(tmp_path)
    host = probe.name.rsplit("@", 1)[1].removesuffix(".partial")
    gone, me, ticks = dead_pid(), os.getpid(), start_ticks(os.getpid())
    stale = [probe,
             tmp_path / f".a.safetensors.{gone}-{ticks}@{host}.partial",      # dead PID
             tmp_path / f".b.safetensors.{me}-{ticks + 1}@{host}.partial",    # PID reused
             tmp_path / f".c.safetensors.{gone}.partial"]                     # older naming
    kept = [tmp_path / f".d.safetensors.{me}-{ticks}@{host}.partial",         # alive: this test
            tmp_path / f".e.safetensors.{gone}-{ticks}@elsewhere.partial",    # another machine
            tmp_path / f".notes.txt.{gone}.partial",                          # not ours
            tmp_path / f"f.safetensors.{gone}.partial",                       # no leading dot
            tmp_path / ".g.safetensors.partial",                              # no PID
            tmp_path / f".h.safetensors.{gone}-{ticks}@{host}.partial.bak"]   # another suffix
    for path in stale[1:] + kept:
        path.write_bytes(b"x")
    (tmp_path / f".i.safetensors.{gone}.partial").mkdir()                     # a folder
    kept.append(tmp_path / f".i.safetensors.{gone}.partial")                  # ... old name
    (tmp_path / f".j-diffusers.{gone}-{ticks}@{host}.partial").mkdir()        # an export's
    (tmp_path / f".j-diffusers.{gone}-{ticks}@{host}.partial" / "unet").mkdir()
    stale.append(tmp_path / f".j-diffusers.{gone}-{ticks}@{host}.partial")    # ... dead
    (tmp_path / f".k-diffusers.{me}-{ticks}@{host}.partial").mkdir()
    kept.append(tmp_path / f".k-diffusers.{me}-{ticks}@{host}.partial")       # ... alive
    merge_ok(tiny_sd1, tmp_path / "next.safetensors")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
