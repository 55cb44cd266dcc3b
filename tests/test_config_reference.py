"""The configuration reference: generated from the schema, complete, and current in docs/."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from segflow.config import PipelineConfig
from segflow.config.train import TrainConfig
from segflow.config_reference import (
    END_MARKER,
    REFERENCE_FILE,
    REGENERATE,
    START_MARKER,
    current_block,
    main,
    render_markdown,
)
from segflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / REFERENCE_FILE


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_markdown()


# An independent walk of the schema: model_fields only, no code shared with the generator.
def _models_in(tp: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field annotation holds (through Optional/Annotated/tuple[...]), and whether
    it is a list of them."""
    if typing.get_origin(tp) is typing.Annotated:
        return _models_in(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [_models_in(a) for a in typing.get_args(tp) if a is not type(None)]
        return next(((m, many) for m, many in found if m is not None), (None, False))
    if typing.get_origin(tp) in (tuple, list):
        inner, _ = _models_in(typing.get_args(tp)[0])
        return inner, inner is not None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, False
    return None, False


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel], str]]:
    """(dotted path, model, field name) of every leaf key; ``train`` walked as TrainConfig."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if model is PipelineConfig and name == "train":
            yield from _leaves(TrainConfig, path + ".")
            continue
        nested, many = _models_in(info.annotation)
        if nested is None:
            yield path, model, name
        else:
            yield from _leaves(nested, path + ("[]." if many else "."))


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the reference keyed by their dotted path (cells unescaped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_reference_is_current(rendered: str) -> None:
    text = REFERENCE.read_text()
    assert START_MARKER in text and END_MARKER in text, f"{REFERENCE_FILE} lacks the markers: run `{REGENERATE}`"
    assert current_block(text) == rendered, (
        f"{REFERENCE_FILE}'s configuration reference is stale: run `{REGENERATE}`"
    )


def test_every_leaf_key_is_documented(rendered: str) -> None:
    rows = _rows(rendered)
    leaves = [p for p, _, _ in _leaves(PipelineConfig)]
    assert len(leaves) > 100  # the walk really went into train.*
    missing = [p for p in leaves if p not in rows]
    assert not missing, f"keys missing from the reference: {missing}"
    for path in ("train.model.arch", "train.stores.train[].store", "classes[].id",
                 "train.augment.elastic.sigma", "prepare.train_region.bbox"):
        assert path in rows


def test_defaults_shown_are_the_models_defaults(rendered: str) -> None:
    rows = _rows(rendered)
    for path, model, name in _leaves(PipelineConfig):
        default_cell = rows[path][2]
        if model.model_fields[name].is_required():
            assert default_cell == "**required**", path
            continue
        shown = json.loads(default_cell.strip("`"))
        value = getattr(model.model_construct(), name)  # defaults, factories called
        assert shown == to_jsonable_python(value), path


def test_types_choices_constraints_and_descriptions(rendered: str) -> None:
    rows = _rows(rendered)
    assert rows["ingest.chunk"][1:4] == ["`int`", "`512`", "> 0, <= 16384"]
    assert rows["ingest.shard"][1] == "`int | null`" and rows["ingest.shard"][3] == "> 0"
    assert '"gaussian"' in rows["segment.mode"][3]
    assert rows["train.loss.lambdas"][1:4] == ["`[float, float]`", "`[1.0, 1.0]`", "each >= 0"]
    assert rows["train.sampling.class_probs"][3] == "values >= 0"
    assert rows["train.augment.elastic.order"][3] == "one of 1, 3"
    assert "^[A-Za-z0-9_.-]+$" in rows["name"][3]
    # numpydoc "alpha, beta" entries describe both; RST literals become Markdown code
    assert rows["train.loss.alpha"][4] == rows["train.loss.beta"][4] != ""
    prose = rendered.replace("```", "")
    assert "``" not in prose and ":class:" not in prose


def test_cli_print_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   rendered: str) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == rendered
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n\n{START_MARKER}\nold\n{END_MARKER}\n\nafter\n")
    assert main(["--check", str(doc)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["--write", str(doc)]) == 0
    assert main(["--check", str(doc)]) == 0
    written = doc.read_text()
    assert written.startswith("# x\n\n") and written.endswith(f"{END_MARKER}\n\nafter\n")
    assert main(["--write", str(doc)]) == 0 and doc.read_text() == written  # idempotent
    doc.write_text("no markers\n")
    assert main(["--write", str(doc)]) == 2
    assert "config-reference:start" in capsys.readouterr().err


def test_missing_markers_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="add the two markers"):
        current_block("nothing here")


def test_descriptions_from_field_or_numpydoc_attributes() -> None:
    from pydantic import Field

    from segflow.config_reference import model_fields_doc

    class Demo(BaseModel):
        """A demo section.

        Attributes
        ----------
        a, b : int
            Two counts, in ``px``.
        """

        a: int = 1
        b: int = 2
        c: int = Field(default=3, description="Set by :func:`~segflow.x.f`.")
        d: int = 4

    docs = {f.name: f.description for f in model_fields_doc(Demo, "demo")}
    assert docs == {"a": "Two counts, in `px`.", "b": "Two counts, in `px`.",
                    "c": "Set by `f`.", "d": ""}
