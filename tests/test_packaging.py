"""`pip install .` gives a working package: every subpackage and the presets are in the wheel."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_finetune_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "finetune").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "finetune.recipes" in listed


def test_every_preset_file_is_a_registered_recipe():
    import finetune

    names = sorted(p.stem for p in (ROOT / "presets").glob("*.toml"))
    assert finetune.presets.list() == names
    assert {"full", "discriminative", "linear-probe", "layer-decay", "gradual-unfreeze", "vit", "sft", "stable"} <= set(
        names
    )
