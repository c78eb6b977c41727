"""Packaging: every package of the library is installed, and nothing named `models` or `data`."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed_under_an_unambiguous_name():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(conf["packages"]), conf["package-dir"]
    assert not {"models", "data"} & {p.split(".")[0] for p in packages}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "certtrain").rglob("__init__.py")}
    assert found <= packages, f"not installed: {sorted(found - packages)}"
    assert dirs == {"certtrain_models": "models", "certtrain_data": "data"}
    for name, folder in dirs.items():
        assert (ROOT / folder / "__init__.py").is_file() and name in packages


def test_library_imports_neither_zoo_nor_data():
    """certtrain/ never imports models/ or data/ (the design card)."""
    for p in (ROOT / "certtrain").rglob("*.py"):
        text = p.read_text()
        for name in ("certtrain_models", "certtrain_data"):
            assert f"import {name}" not in text and f"from {name}" not in text, p
