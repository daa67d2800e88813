"""Every shipped recipe resolves (dry run) against the schema."""

from pathlib import Path

import pytest

from dmdcli.cli import main
from dmdcli.recipe import TeacherRecipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_resolves(path, capsys):
    command = "train-teacher" if path.stem.endswith("-teacher") else "distill"
    extra = ["--set", "regression.pairs='x'"] if "-dmd" in path.stem else []
    assert main([command, str(path), "--dry-run", *extra]) == 0
    text = capsys.readouterr().out
    assert text.startswith("[run]") and 'out = "runs/' + path.stem + '"' in text
    if command == "train-teacher":
        load_recipe(path, schema=TeacherRecipe)


def test_recipe_reference_is_current_and_complete():
    """docs/recipes.md is `dmd recipe-keys` (regenerate it with that command when the schema
    changes), and every key of both recipe kinds has a type, a default and a meaning."""
    from pathlib import Path

    from dmdcli.recipe import Recipe, TeacherRecipe, dotted, to_dict
    from dmdcli.recipe_keys import keys, markdown

    assert (Path(__file__).parent.parent / "docs" / "recipes.md").read_text() == markdown() + "\n"
    for cls in (Recipe, TeacherRecipe):
        rows = keys(cls)
        assert [k for k, *_ in rows] == list(dotted(to_dict(cls())))
        assert [k for k, _, _, meaning in rows if not meaning] == []
