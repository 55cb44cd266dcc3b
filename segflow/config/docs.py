"""The documentation of a schema's fields, read from its numpydoc docstrings.

The configuration reference and the command-line help both read a field's description here,
so it is written once, in the schema's ``Attributes`` section.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import BaseModel

__all__ = ["doc_parts", "field_docs"]

_SECTION_RULE = re.compile(r"^-{3,}\s*$")


def doc_parts(obj: Any) -> tuple[str, dict[str, str]]:
    """(prose before the first numpydoc section, {section title: body}) of ``obj.__doc__``."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    lines = doc.splitlines()
    starts = [
        i - 1
        for i in range(1, len(lines))
        if _SECTION_RULE.match(lines[i]) and lines[i - 1].strip()
    ]
    intro = "\n".join(lines[: starts[0]] if starts else lines).strip()
    parts: dict[str, str] = {}
    for n, s in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(lines)
        parts[lines[s].strip()] = "\n".join(lines[s + 2 : stop]).strip("\n")
    return intro, parts


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> text from the numpydoc ``Parameters``/``Attributes`` sections of the
    model and of the models it extends (its own text first)."""
    out: dict[str, str] = {}
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            for name, text in _own_param_docs(cls).items():
                out.setdefault(name, text)
    return out


def _own_param_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> text from the ``Parameters``/``Attributes`` sections of ``model``'s own docstring."""
    if "__doc__" not in vars(model):
        return {}
    _, parts = doc_parts(model)
    out: dict[str, str] = {}
    for title in ("Parameters", "Attributes"):
        entries: list[tuple[list[str], list[str]]] = []  # (names, description lines)
        for line in parts.get(title, "").splitlines():
            if line and not line[0].isspace():  # "name", "a, b" or "name : type"
                entries.append(([n.strip() for n in line.split(":")[0].split(",")], []))
            elif entries:
                entries[-1][1].append(line.strip())
        for names, body in entries:
            for nm in names:
                if nm:
                    out.setdefault(nm, " ".join(" ".join(body).split()))
    return out
