"""Each segment_region option is declared once (segflow.config.segment); the command line,
the flow's parameters, the pipeline YAML and the engine derive from it, and messages name an
option as the user gave it."""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path
from types import ModuleType

import pytest
from _flow_runner import load_flow
from pydantic import BaseModel

from segflow.config import SegmentConfig
from segflow.config.cli import add_options, model_from_args, model_signature
from segflow.config.segment import FLAGS, SegmentOptions, SegmentRequest
from segflow.errors import ConfigError, RegionError, option, options_named
from segflow.infer.options import InferenceOptions
from segflow.region import resolve_region

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"image": "a.tif", "model": "ck", "out": "o.tif"}


def _flow_module() -> ModuleType:
    return load_flow("segment_region.py")


def _tile_declarations() -> list[str]:
    """Every ``tile`` field or parameter in segflow/ and flows/ with a literal default (but
    the writers' TIFF block side in segflow/io/, another option of the same name)."""
    found = []
    paths = [*(ROOT / "segflow").rglob("*.py"), *(ROOT / "flows").glob("*.py")]
    for path in (p for p in paths if not p.is_relative_to(ROOT / "segflow" / "io")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "tile":
                if isinstance(node.value, ast.Constant):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                named = [*args.posonlyargs, *args.args]
                pairs = list(
                    zip(named[len(named) - len(args.defaults) :], args.defaults, strict=True)
                )
                pairs += [
                    (a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d
                ]
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                    for a, d in pairs
                    if a.arg == "tile" and isinstance(d, ast.Constant)
                ]
    return found


def test_the_tile_default_lives_in_one_place() -> None:
    """One declaration; the command line, the flow, the YAML and the engine derive from it."""
    assert _tile_declarations() == ["segflow/config/segment.py:" + str(_line_of_tile())]
    default = SegmentOptions.model_fields["tile"].default
    assert "tile" not in SegmentConfig.__annotations__  # inherited, not redeclared
    assert "tile" not in SegmentRequest.__annotations__
    assert SegmentConfig().tile == SegmentRequest(**PATHS).tile == default
    assert InferenceOptions(halo=0).tile == default
    assert model_signature(SegmentRequest).parameters["tile"].default == default
    p = argparse.ArgumentParser()
    flags = add_options(p, SegmentRequest, flags=FLAGS, skip=("tta_flips", "tta_set"))
    args = p.parse_args(["--image", "a.tif", "--model", "ck", "--out", "o.tif"])
    assert "tile" not in vars(args)  # not given: the model's default applies
    assert model_from_args(SegmentRequest, args, flags).tile == default
    assert f"(default {default})" in _flow_module().parser().format_help()


def _line_of_tile() -> int:
    tree = ast.parse((ROOT / "segflow/config/segment.py").read_text())
    return next(
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "tile"
    )


def test_every_option_has_a_flag_and_a_flow_parameter() -> None:
    flow = _flow_module()
    actions = {a.dest: a for a in flow.parser()._actions}
    for name in SegmentRequest.model_fields:
        assert name in actions or FLAGS.get(name) == "--tta", name
    assert actions["qupath_geojson"].option_strings == ["--qupath"]
    params = flow.segment_region_flow.parameters.model_dump()["properties"]
    assert set(params) == set(SegmentRequest.model_fields)
    assert params["tile"]["exclusiveMinimum"] == 0  # the bound travels with the declaration
    signature = inspect.signature(flow.segment_region_flow.fn)
    assert list(signature.parameters)[:3] == ["image", "model", "out"]


def test_flags_not_given_keep_the_models_defaults() -> None:
    flow = _flow_module()
    req = flow.request_from_args(
        flow.parser().parse_args(["--image", "a.tif", "--model", "ck", "--out", "o.tif"])
    )
    assert req == SegmentRequest(**PATHS)
    req = flow.request_from_args(
        flow.parser().parse_args(
            ["--image", "a.tif", "--model", "ck", "--out", "o.tif", "--window", "1", "2", "3", "4"]
        )
    )
    assert req.window == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
        (["--overlap", "1.5"], "--overlap 1.5: Input should be less than 1"),
        (["--min-area", "-1"], "--min-area -1.0:"),
    ],
)
def test_a_bad_flag_is_named_as_typed(argv: list[str], expected: str) -> None:
    flow = _flow_module()
    args = flow.parser().parse_args(["--image", "a.tif", "--model", "ck", "--out", "o.tif", *argv])
    with pytest.raises(ConfigError) as err:
        flow.request_from_args(args)
    assert str(err.value).startswith(expected)


def test_messages_name_the_option_as_the_user_gave_it() -> None:
    def outside() -> str:
        with pytest.raises(RegionError) as err:
            resolve_region(height=10, width=10, window=(20, 20, 5, 5))
        return str(err.value)

    assert "region --window 20 20 5 5 lies outside" in outside()  # the default: a command line
    with options_named("yaml", prefix="segment."):
        assert "region segment.window: [20, 20, 5, 5] lies outside" in outside()
        assert option("tile", 256) == "segment.tile: 256"
    with options_named("cli", flags={"tile": "-t"}):
        assert option("tile", 256) == "-t 256"
    assert option("tta_flips", flag="--tta") == "--tta"


def test_the_pipeline_section_and_the_request_share_the_options() -> None:
    shared = set(SegmentOptions.model_fields)
    assert shared <= set(SegmentConfig.model_fields) and shared <= set(SegmentRequest.model_fields)
    for name in shared:
        a, b = SegmentConfig.model_fields[name], SegmentRequest.model_fields[name]
        assert (a.annotation, a.default, a.metadata) == (b.annotation, b.default, b.metadata)
    assert issubclass(SegmentConfig, BaseModel)
    with pytest.raises(ValueError, match="needs tta_flips"):
        SegmentRequest(**PATHS, tta_set="horizontal")
