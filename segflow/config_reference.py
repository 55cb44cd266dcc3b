"""The configuration reference, generated from the pydantic models.

Walks :class:`segflow.config.PipelineConfig` (its ``train`` section included) and renders one Markdown table per section: every key's dotted path,
type, default, allowed values (``Literal`` choices and ``ge``/``gt``/``le``/``lt``/length/
pattern constraints) and description. Descriptions come from ``Field(description=...)`` or,
failing that, from the model's numpydoc ``Parameters``/``Attributes`` section; the rest of
the class docstring introduces its section. Nothing is written by hand, so the reference in
``docs/configuration.md`` cannot drift from the schema (``tests/test_config_reference.py``
checks it)::

    python -m segflow.config_reference                                # print the Markdown
    python -m segflow.config_reference --write docs/configuration.md  # replace its block
    python -m segflow.config_reference --check docs/configuration.md  # exit 1 when stale

Examples
--------
>>> from segflow.config import IngestConfig
>>> chunk = next(f for f in model_fields_doc(IngestConfig, "ingest") if f.name == "chunk")
>>> chunk.path, chunk.type, chunk.default, chunk.allowed
('ingest.chunk', 'int', '512', '> 0, <= 16384')
"""

from __future__ import annotations

import argparse
import builtins
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from segflow.config.docs import doc_parts as _doc_parts
from segflow.config.docs import field_docs as _param_docs
from segflow.errors import ConfigError

__all__ = [
    "END_MARKER",
    "REFERENCE_FILE",
    "REGENERATE",
    "START_MARKER",
    "FieldDoc",
    "Section",
    "current_block",
    "main",
    "model_fields_doc",
    "render_markdown",
    "replace_block",
    "sections",
]

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"
#: The file that holds the reference, relative to the checkout.
REFERENCE_FILE = "docs/configuration.md"
REGENERATE = f"python -m segflow.config_reference --write {REFERENCE_FILE}"


@dataclass(frozen=True)
class FieldDoc:
    """One key of the reference, rendered as text (``default`` is JSON, ``""`` if required)."""

    path: str
    name: str
    type: str
    default: str
    required: bool
    allowed: str
    description: str
    section: str | None = None  # the dotted path of the nested section this key opens
    nested: builtins.type[BaseModel] | None = None  # the model of that section
    nullable: bool = False  # the key may be null
    many: bool = False  # the key is a list of ``nested`` entries


@dataclass(frozen=True)
class Section:
    """One model at one place of the YAML: its key prefix, introduction and keys."""

    path: str
    model: type[BaseModel]
    intro: str
    fields: tuple[FieldDoc, ...]
    optional: bool = False
    many: bool = False
    extra: str = ""


# ------------------------------------------------------------------------------ types
def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _split_annotated(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, Field(gt=0)]`` -> (T, [Gt(0)]); anything else -> (tp, [])."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        flat: list[Any] = []
        for m in meta:
            flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        return base, flat
    return tp, []


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """(``tp`` without ``None`` in its union, whether ``None`` was there)."""
    args = _union_args(tp)
    if args is None or type(None) not in args:
        return tp, False
    rest = tuple(a for a in args if a is not type(None))
    return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007


def _nested_model(tp: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(the model a field holds, whether it may be null, whether it is a list of them)."""
    inner, nullable = _strip_none(tp)
    inner, _ = _split_annotated(inner)
    if _is_model(inner):
        return inner, nullable, False
    args = typing.get_args(inner)
    homogeneous = len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis)
    if typing.get_origin(inner) in (tuple, list) and homogeneous and _is_model(args[0]):
        return args[0], nullable, True
    return None, nullable, False


def _type_name(tp: Any) -> str:
    """A YAML-minded name: tuples are lists, dicts mappings, None null, Literals their type."""
    tp, _ = _split_annotated(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    args = _union_args(tp)
    if args is not None:
        names: list[str] = []
        for a in args:
            n = _type_name(a)
            if n not in names:
                names.append(n)
        if "null" in names:  # null last, whatever the declaration order
            names.remove("null")
            names.append("null")
        return " | ".join(names)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        kinds = sorted({type(v).__name__ for v in typing.get_args(tp)})
        return " | ".join(kinds)
    if origin in (tuple, list):
        items = typing.get_args(tp)
        if origin is list or (len(items) == 2 and items[1] is Ellipsis):
            return f"list[{_type_name(items[0])}]"
        return "[" + ", ".join(_type_name(a) for a in items) + "]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping[{_type_name(k)}, {_type_name(v)}]"
    if _is_model(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _constraint_text(meta: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for m in meta:
        if isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            out.append(f">= {m.ge}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            out.append(f"<= {m.le}")
        elif isinstance(m, at.MinLen):
            out.append(f"length >= {m.min_length}")
        elif isinstance(m, at.MaxLen):
            out.append(f"length <= {m.max_length}")
        elif getattr(m, "pattern", None) is not None:
            out.append(f"matches `{m.pattern}`")
    return out


def _allowed(tp: Any, meta: Sequence[Any] = ()) -> list[str]:
    """Choices and constraints of a type, item constraints prefixed ("each", "values")."""
    tp, inner_meta = _split_annotated(tp)
    out = _constraint_text([*meta, *inner_meta])
    args = _union_args(tp)
    if args is not None:
        for a in args:
            out += [t for t in _allowed(a) if t not in out]
        return out
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [*out, "one of " + ", ".join(json.dumps(v) for v in typing.get_args(tp))]
    if origin in (tuple, list):
        items = [a for a in typing.get_args(tp) if a is not Ellipsis]
        each: list[str] = []
        for a in items:
            each += [t for t in _allowed(a) if t not in each]
        return out + [f"each {t}" for t in each]
    if origin is dict:
        k, v = typing.get_args(tp)
        return out + [f"keys {t}" for t in _allowed(k)] + [f"values {t}" for t in _allowed(v)]
    return out


# ------------------------------------------------------------------------ docstrings
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def _inline_md(text: str) -> str:
    """Sphinx roles and ``literals`` to Markdown code spans."""

    def role(m: re.Match[str]) -> str:  # :class:`~a.b.C` -> `C`, :func:`a.f` -> `a.f`
        return f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`"

    return _ROLE.sub(role, text).replace("``", "`")


def _rst_to_md(text: str) -> str:
    """Sphinx roles and ``literals`` to Markdown code; ``::`` literal blocks to fences."""

    text = _inline_md(text)
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])  # "spells::" -> "spells:"
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```yaml", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        out.append(line)
        i += 1
    return _reflow("\n".join(out))


def _reflow(text: str) -> str:
    """Join wrapped prose lines into one line per paragraph (code fences kept as they are)."""
    paras: list[str] = []
    cur: list[str] = []
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            if not fence:
                paras.append(line)
            else:
                paras[-1] += "\n" + line
            fence = not fence
            continue
        if fence:
            paras[-1] += "\n" + line
        elif not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


# --------------------------------------------------------------------------- walking
def _default_text(info: FieldInfo) -> tuple[str, bool]:
    """(the default as JSON, whether the key is required)."""
    if info.is_required():
        return "", True
    value = info.get_default(call_default_factory=True)
    dumped = TypeAdapter(Any).dump_python(value, mode="json")
    return json.dumps(dumped, separators=(", ", ": ")), False


def model_fields_doc(model: type[BaseModel], prefix: str) -> list[FieldDoc]:
    """The keys of ``model`` under the dotted ``prefix``, in declaration order."""
    params = _param_docs(model)
    out: list[FieldDoc] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        path = f"{prefix}.{key}" if prefix else key
        annotation: Any = info.annotation
        nested, nullable, many = _nested_model(annotation)
        default, required = _default_text(info)
        if nested is not None:
            shape = "list[mapping]" if many else "mapping"
            typ = shape + (" | null" if nullable else "")
            sec = path + ("[]" if many else "")
            allowed = ""
            if not required and default not in ("null", "[]", "{}") and not many:
                default = "(defaults below)"
        else:
            typ = _type_name(annotation)
            sec = None
            allowed = ", ".join(_allowed(annotation, info.metadata))
        out.append(FieldDoc(
            path=path, name=key, type=typ, default=default, required=required,
            allowed=allowed, description=_inline_md(info.description or params.get(name, "")),
            section=sec, nested=nested, nullable=nullable, many=many,
        ))
    return out


def _arch_table() -> str:
    """ModelConfig's per-architecture defaults and choices (from segflow.train.models)."""
    from segflow.config.model import ARCH_DEFAULTS, NORM_CHOICES, UPSAMPLE_CHOICES

    rows = ["| arch | defaults filled in | upsample | norm |", "|---|---|---|---|"]
    for arch, defaults in ARCH_DEFAULTS.items():
        filled = ", ".join(f"{k}={json.dumps(v)}" for k, v in defaults.items())
        rows.append(
            f"| `{arch}` | {filled} | {', '.join(sorted(UPSAMPLE_CHOICES[arch]))} "
            f"| {', '.join(sorted(NORM_CHOICES[arch]))} |"
        )
    return ("Options left out (or null) take the architecture's value below; an "
            "architecture-specific option given to another architecture is refused.\n\n"
            + "\n".join(rows))


def _train_module_notes() -> str:
    from segflow.config import train as train_config

    _, parts = _doc_parts(train_config)
    return "\n\n".join(f"**{t}.** " + _rst_to_md(parts[t]) for t in ("Data", "Normalization")
                       if t in parts)


def sections() -> list[Section]:
    """Every section of a pipeline YAML, depth first, the ``train`` subtree included."""
    from segflow.config import PipelineConfig
    from segflow.config.model import ModelConfig
    from segflow.config.train import TrainConfig

    extras: dict[type[BaseModel], Callable[[], str]] = {
        TrainConfig: _train_module_notes, ModelConfig: _arch_table,
    }
    out: list[Section] = []

    def visit(model: type[BaseModel], path: str, *, optional: bool, many: bool) -> None:
        fields = model_fields_doc(model, path + ("[]" if many else ""))
        intro, _ = _doc_parts(model)
        extra = extras.get(model)
        out.append(Section(path=path + ("[]" if many else ""), model=model,
                           intro=_rst_to_md(intro), fields=tuple(fields), optional=optional,
                           many=many, extra=extra() if extra else ""))
        for f in fields:
            if f.nested is not None:
                visit(f.nested, f.path, optional=f.nullable, many=f.many)

    visit(PipelineConfig, "", optional=False, many=False)
    return out


# ------------------------------------------------------------------------- rendering
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def render_markdown() -> str:
    """The whole reference as Markdown (deterministic: the staleness test compares it)."""
    lines = [
        f"<!-- generated by `{REGENERATE}` from the pydantic models: do not edit by hand -->",
        "",
        "Every key of a pipeline YAML (`pipelines/*.yaml`). Unknown keys are refused; keys "
        "without a default are **required** when their section is given. `list[...]` is a "
        "YAML list, `mapping` a YAML mapping, `null` may be written `~` or left out.",
    ]
    for sec in sections():
        title = f"`{sec.path}`" if sec.path else "top level"
        lines += ["", f"#### {title} ({sec.model.__name__})", ""]
        notes = []
        if sec.many:
            notes.append("A list; each entry has these keys.")
        if sec.optional:
            notes.append("May be left out (null, the default).")
        if sec.intro:
            lines += [sec.intro, ""]
        if notes:
            lines += [" ".join(notes), ""]
        if sec.extra:
            lines += [sec.extra, ""]
        lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in sec.fields:
            default = "**required**" if f.required else (
                f.default if f.default.startswith("(") else _code(f.default))
            desc = f.description
            if f.section is not None:
                desc = (desc + " " if desc else "") + f"See `{f.section}`."
            lines.append(f"| `{f.path}` | {_code(f.type)} | {default} | {_cell(f.allowed)} | "
                         f"{_cell(desc)} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str, *, source: str = REFERENCE_FILE) -> str:
    """``text`` with what lies between the two markers replaced by ``block``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ConfigError(f"{source}: no '{START_MARKER}' ... '{END_MARKER}' block: add the two "
                          "markers where the reference belongs")
    return text[: start + len(START_MARKER)] + "\n" + block + text[end:]


def current_block(text: str, *, source: str = REFERENCE_FILE) -> str:
    """What lies between the markers of ``text`` (as :func:`replace_block` writes it)."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ConfigError(f"{source}: no '{START_MARKER}' ... '{END_MARKER}' block: add the two "
                          "markers where the reference belongs")
    return text[start + len(START_MARKER) + 1 : end]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the reference, ``--write FILE`` or ``--check FILE``."""
    ap = argparse.ArgumentParser(prog="python -m segflow.config_reference",
                                 description="Render the pipeline configuration reference.")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the marked block of FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE's block is stale")
    args = ap.parse_args(argv)
    block = render_markdown()
    if args.write is None and args.check is None:
        sys.stdout.write(block)
        return 0
    path = Path(args.write or args.check)
    try:
        text = path.read_text()
        if args.check is not None:
            if current_block(text, source=str(path)) != block:
                print(f"{path}: the configuration reference is stale: run `{REGENERATE}`",
                      file=sys.stderr)
                return 1
            return 0
        new = replace_block(text, block, source=str(path))
    except (OSError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if new != text:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
