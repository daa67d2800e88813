"""The package's layout: every subpackage and shipped file reaches a wheel, and the teacher
registry sits above the teacher modules (no import cycle between them)."""

import ast
import fnmatch
import tomllib
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "dmdcli"
FAMILIES = {"gmm", "diffusers_unets", "edm"}   # convert_edm.py is edm's pickle reader


def test_every_subpackage_and_asset_is_packaged():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert set(config["packages"]) == packages
    globs = config["package-data"]["dmdcli"]
    unpackaged = [str(f.relative_to(PKG)) for f in (PKG / "assets").rglob("*") if f.is_file()
                  and not any(fnmatch.fnmatch(str(f.relative_to(PKG)), g) and
                              str(f.relative_to(PKG)).count("/") == g.count("/") for g in globs)]
    assert not unpackaged, f"add package-data globs for {unpackaged}"


def module_level_imports(path: Path) -> set[str]:
    """The sibling modules of the same package that a module imports at module level (imports
    inside functions are lazy); "" for the package itself."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else
                         [a.name if (path.parent / f"{a.name}.py").is_file() else "" for a in node.names])
    return found


def test_teacher_modules_do_not_import_each_other_or_the_registry():
    """base.py (the interface) imports no teacher family; each family module imports the
    interface, never the registry (the package) or another family at import time; the
    registry imports a family only when a recipe names it."""
    teachers = PKG / "teachers"
    assert not module_level_imports(teachers / "base.py") & FAMILIES
    for name in FAMILIES | {"convert_edm", "hub"}:
        imports = module_level_imports(teachers / f"{name}.py")
        assert "" not in imports and not imports & (FAMILIES - {name, "edm" if name == "convert_edm" else name}), name
    assert module_level_imports(teachers / "__init__.py") == {"base"}
