"""Every recipe key with its type, default and meaning, read from the schema in recipe.py
(the dataclasses, their comments and choices), so the reference cannot go stale:
`dmd recipe-keys` prints it and docs/recipes.md is its output (a test compares the two)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from .recipe import Recipe, TeacherRecipe

_FIELD = re.compile(r"^\s+(\w+): [^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """Field name -> its comment in the source: the one on its line, else the lines above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        m = _FIELD.match(line) if stripped and not stripped.startswith(('"""', "def ", "@")) else None
        if m:
            text = m.group(2) or " ".join(above)
            out[m.group(1)] = text.strip()
        above = []
    return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, str(tp))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    text = str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else repr(value)
    return f"`{text}`"


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.;)])\s+(?=[A-Z])", text, maxsplit=1)[0]


def keys(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every leaf key of a recipe class."""
    hints, notes, rows = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += keys(tp, f"{prefix}{f.name}.")
            continue
        kind = "one of " + ", ".join(f'"{c}"' for c in f.metadata["choices"]) if "choices" in f.metadata \
            else _type_name(tp)
        rows.append((prefix + f.name, kind, _default(f), _first_sentence(notes.get(f.name, ""))))
    return rows


def markdown() -> str:
    parts = ["# Recipe keys", "",
             "Generated from the schema in `dmdcli/recipe.py` by `dmd recipe-keys`; do not edit by hand.",
             "A recipe is a TOML file of these sections; a key left out takes its default, an unknown",
             "key or a wrong type is refused in one line. `--set section.key=value` overrides one key.", ""]
    for title, cls in (("`dmd distill` (and make-pairs' teacher settings)", Recipe),
                       ("`dmd train-teacher`", TeacherRecipe)):
        parts += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        parts += [f"| `{k}` | {t} | {d} | {m.replace('|', '/')} |" for k, t, d, m in keys(cls)]
        parts.append("")
    return "\n".join(parts)
