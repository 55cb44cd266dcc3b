"""Command-line flags derived from a schema: one declaration per option.

:func:`add_options` adds one ``--flag`` per field of a pydantic model to an
:mod:`argparse` parser: the type, the choices, the metavar and the help (the first sentence
of the field's description and its default) come from the model. The parser's own default
is "not given", so a value the user does not type is never passed and the model's default
applies: the default lives only in the model. :func:`model_from_args` builds the model from
the parsed flags and turns a validation error into one line naming the flag as typed.

Examples
--------
>>> import argparse
>>> from segflow.config.segment import SegmentOptions
>>> p = argparse.ArgumentParser()
>>> flags = add_options(p, SegmentOptions, skip=("tta_flips", "tta_set"))
>>> flags["batch_size"]
'--batch-size'
>>> model_from_args(SegmentOptions, p.parse_args(["--tile", "256"]), flags).tile
256
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from segflow.errors import ConfigError

__all__ = ["add_options", "flag_for", "model_from_args", "model_signature"]

M = TypeVar("M", bound=BaseModel)


def flag_for(name: str) -> str:
    """The flag of field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?([^`.]+)`")


def _plain(text: str) -> str:
    """A field description as terminal text: ``literal`` -> literal, :class:`~a.B` -> B."""
    text = text.replace("``", "")
    text = _ROLE.sub(r"\1", text)
    # argparse %-formats help strings
    return text.replace("%", "%%").strip().rstrip(".")


def argparse_kwargs(info: FieldInfo, doc: str) -> dict[str, Any]:
    """The :meth:`argparse.ArgumentParser.add_argument` options of one field."""
    tp = _strip_optional(info.annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    default = None if info.is_required() else info.default
    shown = "" if default in (None, False) else f" (default {default})"
    kw: dict[str, Any] = {"help": _plain(doc) + shown if doc else None}
    kw["default"] = argparse.SUPPRESS
    origin = typing.get_origin(tp)
    if tp is bool:  # a switch on by default is turned off with --no-NAME
        kw["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
    elif origin is Literal:
        kw["choices"] = typing.get_args(tp)
    elif origin is tuple and typing.get_args(tp)[-1] is not Ellipsis:
        args = typing.get_args(tp)
        kw.update(nargs=len(args), type=args[0])
    elif origin in (tuple, list):  # tuple[int, ...], list[int]: one or more values
        kw.update(nargs="+", type=typing.get_args(tp)[0])
    elif tp in (int, float, str):
        kw["type"] = tp
    else:  # pragma: no cover - a schema change the command line must learn about
        raise TypeError(f"no command-line form for {info.annotation!r}")
    if "metavar" in extra:
        kw["metavar"] = tuple(extra["metavar"])  # type: ignore[arg-type]
    return kw


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    skip: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Add one flag per field of ``model`` (but ``skip``) to ``parser``; return field -> flag.

    ``flags`` renames fields whose flag is not ``--field-name`` (e.g. a shorter one).
    """
    from segflow.config.docs import field_docs

    docs = field_docs(model)
    named: dict[str, str] = {}
    fields = model.model_fields.items()
    # the required options first: they are what a reader of --help looks for
    for name, info in sorted(fields, key=lambda f: not f[1].is_required()):
        if name in skip:
            continue
        flag = (flags or {}).get(name, flag_for(name))
        kw = argparse_kwargs(info, docs.get(name, ""))
        if "metavar" not in kw and "type" in kw and "nargs" not in kw:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(flag, dest=name, **kw)
        named[name] = flag
    return named


def model_from_args(
    model: type[M],
    args: argparse.Namespace,
    flags: Mapping[str, str] | None = None,
    **values: Any,
) -> M:
    """``model`` from the flags given in ``args`` (others keep the model's defaults) and
    ``values``; a bad value is one :class:`ConfigError` line naming its flag (``flags``:
    field -> flag where it is not ``--field-name``, as given to :func:`add_options`)."""
    flags = flags or {}
    given = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model(**{**given, **values})
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        flag = flags.get(name, flag_for(name)) if name else "(arguments)"
        value = first.get("input")
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{flag} {shown}: {msg}").with_traceback(None) from None


def model_signature(model: type[BaseModel]) -> inspect.Signature:
    """One keyword parameter per field of ``model``, with its type and default.

    Given to a function as ``__signature__``, it makes a Prefect flow's parameters (and a
    deployment's ``-p NAME=VALUE`` overrides) the model's fields, without writing them again.
    """
    fields = sorted(model.model_fields.items(), key=lambda f: not f[1].is_required())
    return inspect.Signature(
        [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if info.is_required() else info.default,
                annotation=info.rebuild_annotation(),
            )
            for name, info in fields
        ]
    )
