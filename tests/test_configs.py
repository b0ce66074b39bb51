"""The commented example configs in configs/ are valid study configs (model files swapped)."""

from pathlib import Path

import pytest
import yaml

from search.config import parse_config
from search.study import check_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,fam_name", [("sd15_example.yaml", "tiny_sd1"),
                                           ("sdxl_example.yaml", "tiny_sdxl")])
def test_example_configs_validate(name, fam_name, request, tmp_path):
    fam = request.getfixturevalue(fam_name)
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    data["models"] = {"model1": str(fam.a), "model2": str(fam.b),
                      **({"base": str(fam.base)} if "base" in data["models"] else {})}
    data["scorers"] = [{"kind": "sanity"}]  # the examples name weight files users hold
    data["output"] = str(tmp_path)
    cfg = parse_config(data, base_dir=ROOT / "configs")
    space = check_config(cfg)
    assert space.all_params()
    recipe = space.recipe({p.name: (p.low + p.high) / 2 for p in space.all_params()})
    recipe.validate()
    if name.startswith("sd15"):
        assert recipe.ratios["OUT09"] == recipe.ratios["OUT11"] and recipe.ratios["M00"] == 0.5
    else:
        assert recipe.method == "add_difference" and 0.5 <= recipe.multiplier <= 1.2
