"""What every configuration schema shares: the model base, the class table, error lines.

Examples
--------
>>> ClassDef(id=1, name="building", color="#FF0000").rgb
(255, 0, 0)
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["DEFAULT_CLASSES", "ClassDef", "SchemaModel", "format_validation_error"]

_HEX_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


class SchemaModel(BaseModel):
    """Base of every schema: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassDef(SchemaModel):
    """One entry of the class table.

    Attributes
    ----------
    id
        The class's value in the stores' ``labels`` arrays and its model output channel
        (training needs ids ``< train.model.out_channels``); unique, and never
        ``ignore_index``. Id 0 is background: prepare derives objects from the other
        classes, vector labels leave uncovered pixels 0, polygons skip it.
    name
        Human-readable name: the value a text ``ingest.class_field`` holds, and the class
        name written to outputs (COG categories, polygon ``class_name``, QuPath, reports).
    color
        ``#rrggbb`` colour of the class in the prediction COG's colour table, the
        quick-look overlay and QuPath annotations.
    """

    id: Annotated[int, Field(ge=0, le=65534)]
    name: Annotated[str, Field(min_length=1)]
    color: str = "#808080"

    @field_validator("color")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX_COLOUR.match(value):
            raise ValueError(f"colour must look like '#rrggbb', got {value!r}")
        return value.lower()

    @property
    def rgb(self) -> tuple[int, int, int]:
        return (int(self.color[1:3], 16), int(self.color[3:5], 16), int(self.color[5:7], 16))


DEFAULT_CLASSES: tuple[ClassDef, ...] = (
    ClassDef(id=0, name="background", color="#000000"),
    ClassDef(id=1, name="foreground", color="#ff0000"),
)


def format_validation_error(err: ValidationError, *, source: str, prefix: str = "") -> str:
    """Turn a pydantic error into one line: where, what, the value, what to do."""
    first = err.errors()[0]
    where = prefix + ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}': remove it or check its spelling"
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}': add it"
    value = first.get("input")
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a whole section failed a cross-field check: no dump of it
        return f"{source}: '{where}' is invalid: {msg}{more}"
    return f"{source}: '{where}' = {value!r} is invalid: {msg}{more}"
