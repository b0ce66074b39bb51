"""Architectures are data files found by a registry: the built-in files are complete and
consistent, a user's file (a folder in $MERGESEARCH_ARCHITECTURES or an entry point) works
without touching the code, bad files are refused with the file and the field, and the README's
table is the registry's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_backend.architectures import (
    ARCHITECTURES,
    ArchitectureFileError,
    UnsupportedModelError,
    detect_architecture,
    load_architecture,
)
from merge_backend.naming import CONVERTERS, key_maps
from merge_backend.pipeline import build_module
from merge_backend.pipeline_configs import TOKENIZER_WRITERS, config_files
from search.cli_architectures import markdown_table

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "merge_backend" / "architectures"


def test_built_in_files_are_the_registry():
    assert {p.stem for p in BUILTIN.glob("*.yaml")} == set(ARCHITECTURES) >= {"sd1", "sd2", "sdxl"}


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_every_vocabulary_groups_the_sliders_consistently(arch_name):
    """A key's block in any vocabulary is its ComfyUI slider's block (the rule every conversion
    relies on), on the full-size and tiny key lists; the longest-prefix rule is written out."""
    arch = ARCHITECTURES[arch_name]
    prefix = arch.diffusion.prefix
    sliders = arch.block_names("comfy")
    for size in arch.configs:
        config = config_files(arch_name, size)[f"{arch.diffusion.folder}/config.json"]
        with torch.device("meta"):
            module = build_module(arch.diffusion.name, config, arch=arch)
        keys = [km.original for km in key_maps(arch, arch.diffusion.name, list(module.state_dict()),
                                               dict(module.config))]
        for key in keys:
            inner = key[len(prefix):]
            matching = [s for s in sliders if inner.startswith(s)]
            slider = max(matching, key=len) if matching else sliders[0]
            assert arch.block_of("comfy", key) == slider
            for vocabulary in arch.vocabulary_names:
                assert arch.block_of(vocabulary, key) == arch.slider_block(vocabulary, slider)


def test_every_converter_and_tokenizer_kind_exists():
    for arch in ARCHITECTURES.values():
        converters = {c.converter for c in arch.components.values()} - {None}  # None: merge only
        assert converters <= set(CONVERTERS), arch.name
        assert {t.kind for t in arch.tokenizers.values()} <= set(TOKENIZER_WRITERS), arch.name


def test_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- architectures:[^>]*-->\n(.*?)<!-- /architectures -->", readme, re.S)
    assert block, "README.md has no generated architectures table"
    assert block.group(1) == markdown_table(), "run `mergesearch architectures --markdown`"


def test_detection_names_every_tiny_family(tiny_sd1, tiny_sd2, tiny_sdxl):
    for fam in (tiny_sd1, tiny_sd2, tiny_sdxl):
        assert detect_architecture(load_file(fam.base), str(fam.base)).name == fam.arch
    with pytest.raises(UnsupportedModelError, match="not supported.*Stable Diffusion 2.x"):
        detect_architecture(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"])


# ---------------------------------------------------------------------------- bad files


def _sd1_text(name: str, **replace: str) -> str:
    text = (BUILTIN / "sd1.yaml").read_text(encoding="utf-8").replace("name: sd1", f"name: {name}")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_a_bad_file_names_the_file_and_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_sd1_text("bad", **{"    prefix: model.diffusion_model.\n": ""}))
    with pytest.raises(ArchitectureFileError, match=r"bad\.yaml: components\.unet\.prefix: "
                                                    "Field required"):
        load_architecture(bad)
    bad.write_text(_sd1_text("bad", **{"[input_blocks.0., time_embed., label_emb.]":
                                       "[input_blocks.0., time_embed.]"}))
    with pytest.raises(ArchitectureFileError, match=r"vocabularies\.mbw\.groups.*label_emb"):
        load_architecture(bad)
    bad.write_text("name: [")
    with pytest.raises(ArchitectureFileError, match=r"bad\.yaml: cannot read it \(not valid "
                       r"YAML: line [0-9]+, column [0-9]+: .+\)$") as refused:
        load_architecture(bad)
    assert "\n" not in str(refused.value)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_two_files_with_one_name_are_refused(tmp_path):
    (tmp_path / "again.yaml").write_text(_sd1_text("sd1"))
    proc = _run("from merge_backend.architectures import ARCHITECTURES; list(ARCHITECTURES)",
                {"MERGESEARCH_ARCHITECTURES": str(tmp_path)})
    assert proc.returncode != 0
    assert re.search(r"again\.yaml: architecture 'sd1' is already defined by .*sd1\.yaml",
                     proc.stderr), proc.stderr


# ---------------------------------------------------------------------------- a user's file

# A user's architecture: SD1's layout recognised first (priority 1) with a vocabulary of their
# own, four groups of ComfyUI's sliders.
QUARTERS = """\
  quarters:
    groups:
      - {block: Q1, sliders: [time_embed., label_emb., input_blocks.0., input_blocks.1.,
                              input_blocks.2., input_blocks.3., input_blocks.4., input_blocks.5.]}
      - {block: Q2, sliders: [input_blocks.6., input_blocks.7., input_blocks.8., input_blocks.9.,
                              input_blocks.10., input_blocks.11., middle_block.0.,
                              middle_block.1., middle_block.2.]}
      - {block: Q3, sliders: [output_blocks.0., output_blocks.1., output_blocks.2.,
                              output_blocks.3., output_blocks.4., output_blocks.5.]}
      - {block: Q4, sliders: [output_blocks.6., output_blocks.7., output_blocks.8.,
                              output_blocks.9., output_blocks.10., output_blocks.11., out.]}
"""


def _quarters(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = _sd1_text("sd1q", **{"title: Stable Diffusion 1.x": "title: SD1 in quarters",
                                "  absent: [conditioner.]\n":
                                "  absent: [conditioner.]\n  priority: 1\n",
                                "report_vocabulary: mbw": QUARTERS + "report_vocabulary: mbw"})
    path = folder / "sd1q.yaml"
    path.write_text(text)
    return path


def test_the_variable_may_name_one_file_and_a_missing_path_is_named(tmp_path):
    """A file named on its own is read (it was refused as a folder that 'does not exist')."""
    path = _quarters(tmp_path / "archs")
    code = "from merge_backend.architectures import ARCHITECTURES; print(sorted(ARCHITECTURES))"
    listed = _run(code, {"MERGESEARCH_ARCHITECTURES": str(path)})
    assert listed.returncode == 0 and "'sd1q'" in listed.stdout, listed.stderr
    gone = tmp_path / "nowhere"
    missing = _run(code, {"MERGESEARCH_ARCHITECTURES": str(gone)})
    assert missing.returncode != 0
    assert f"{gone}: no such architecture folder or file" in missing.stderr


def test_a_users_architecture_file_merges_by_its_own_vocabulary(tmp_path, tiny_sd1):
    """Dropped into a folder named in $MERGESEARCH_ARCHITECTURES: listed, detected first, and
    `mergesearch merge layers --vocabulary quarters` follows ComfyUI's formula per group."""
    _quarters(tmp_path / "archs")
    env = {"MERGESEARCH_ARCHITECTURES": str(tmp_path / "archs")}
    listed = _run("from search.cli import main; main(['architectures', '--markdown'])", env)
    assert "| `sd1q` | SD1 in quarters | ModelMergeSD1 (30) |" in listed.stdout, listed.stderr
    (tmp_path / "r.yaml").write_text("Q1: 0.1\nQ2: 0.4\nQ3: 0.7\nQ4: 0.0\n")
    out = tmp_path / "q.safetensors"
    argv = ["merge", "layers", str(tiny_sd1.a), str(tiny_sd1.b), "-o", str(out), "--vocabulary",
            "quarters", "--ratios-file", str(tmp_path / "r.yaml"), "--dtype", "fp32", "--quiet"]
    proc = _run(f"from search.cli import main; raise SystemExit(main({argv!r}))", env)
    assert proc.returncode == 0, proc.stderr
    a, b, got = load_file(tiny_sd1.a), load_file(tiny_sd1.b), load_file(out)

    def ratio(inner: str) -> float:
        index = int(inner.split(".")[1]) if inner.startswith(("input_blocks.", "output_blocks.")) \
            else None
        if inner.startswith("time_embed.") or (inner.startswith("input_blocks.") and index < 6):
            return 0.1
        if inner.startswith(("input_blocks.", "middle_block.")):
            return 0.4
        return 0.7 if inner.startswith("output_blocks.") and index < 6 else 0.0

    prefix = "model.diffusion_model."
    for key, w1 in a.items():
        if key.startswith(prefix):
            r = ratio(key[len(prefix):])
            expected = w1.float() * r + (1 - r) * b[key].float()  # ModelMergeSD1's formula
            assert torch.equal(got[key], expected), key
    assert sum(k.startswith(prefix) for k in got) > 600


def test_an_entry_point_brings_architecture_files(tmp_path):
    """An installed package's `mergesearch.architectures` entry point names a module whose
    folder holds architecture files (a real dist-info on the path, found by importlib)."""
    site = tmp_path / "site"
    _quarters(site / "myarchs")
    (site / "myarchs" / "__init__.py").write_text("")
    info = site / "myarchs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myarchs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mergesearch.architectures]\nquarters = myarchs\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", str(ROOT))])
    proc = _run("from merge_backend.architectures import ARCHITECTURES; "
                "print(ARCHITECTURES['sd1q'].source)", {"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site / "myarchs" / "sd1q.yaml")
