"""Weight-dependent LoRA formats: how far our apply is from the writers' own merged weight.

For tiny SD1 and SDXL, a file of each kind (DoRA on LoRA / LoHa / LoKr factors, both norm
axes; OFT with and without constraint and rescale; BOFT; IA3 both axes; GLoRA) built with the
``lycoris-lora`` package's modules, and a PEFT DoRA file (``get_peft_model(use_dora=True)``),
applied at strength 0.7 (PEFT: 1.0) through the live pipeline and ``mergesearch lora apply``.
Prints the largest relative error per weight against the reference (LyCORIS module forward /
PEFT merge, on the same base weight) and one GOAL line per format and family.
Needs the ``test`` extra (lycoris-lora, peft); builds on the test helpers.

    .venv/bin/python benchmarks/lora_formats_error.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_lora_weighted as T  # noqa: E402 - the file builders and references
from safetensors.torch import save_file  # noqa: E402

from merge_backend.pipeline import load_pipeline  # noqa: E402
from merge_backend.tiny import write_tiny_family  # noqa: E402

TARGET = 1e-5


def measure(folder: Path) -> dict[tuple[str, str], float]:
    out = {}
    for arch in ("sd1", "sdxl"):
        fam = write_tiny_family(folder / arch, arch, seed=0)
        for case in ("dora", "oft", "boft", "ia3", "glora"):
            src = load_pipeline(fam.base, config_folder=fam.config_folder)
            tensors, modules = T.build_lycoris(src, arch, T.CASES[case])
            path = folder / f"{arch}_{case}.safetensors"
            save_file(tensors, str(path))
            work = folder / f"{arch}_{case}"
            work.mkdir()
            _, _, live, from_file = T._apply_both_ways(fam, path, work, 0.7)
            before = T._weights(src, modules)
            out[(arch, case)] = max(T._check(p, before, modules, 0.7, how, T.lycoris_reference)
                                    for p, how in ((live, "pipeline"), (from_file, "file")))
        base = load_pipeline(fam.base, config_folder=fam.config_folder)
        before = T._weights(base, [(c, p) for c, p, _ in T._targets(base, arch)])
        tensors, meta, layers = T.build_peft_dora(
            load_pipeline(fam.base, config_folder=fam.config_folder), arch)
        path = folder / f"{arch}_peft.safetensors"
        save_file(tensors, str(path), meta)
        work = folder / f"{arch}_peft"
        work.mkdir()
        _, _, live, from_file = T._apply_both_ways(fam, path, work, 1.0)
        out[(arch, "peft_dora")] = max(T._check(p, before, layers, 1.0, how, T.peft_reference)
                                       for p, how in ((live, "pipeline"), (from_file, "file")))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        errors = measure(Path(tmp))
    for (arch, case), err in errors.items():
        verdict = "met" if err <= TARGET else "missed"
        print(f"GOAL lora_{case}_{arch}_relative_error measured={err:.2e} "
              f"target<={TARGET:g} {verdict}")


if __name__ == "__main__":
    main()
