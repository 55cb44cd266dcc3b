"""The code version of a pipeline stage: ``segflow.__version__`` plus a hash of the source of
every ``segflow`` module the stage's entry module imports, transitively (read from the
``import`` statements, so nothing is imported and lazy imports count too).
"""

from __future__ import annotations

import ast
import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

import segflow

__all__ = ["code_version", "module_closure"]

#: Modules whose edits cannot change any output (messages only): left out of code versions.
_NEUTRAL_MODULES = frozenset({"segflow.errors"})
_PACKAGE = "segflow"


def _package_dir() -> Path:
    return Path(segflow.__file__).resolve().parent


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of ``segflow.x.y`` (a module or a package's ``__init__``), or None."""
    parts = name.split(".")
    if parts[0] != _PACKAGE:
        return None
    base = root.joinpath(*parts[1:]) if len(parts) > 1 else root
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


#: CPython 3.11's parser is not safe to run in two threads at once ("AST constructor
#: recursion depth mismatch", seen with two scenes on one Dask worker)
_PARSE_LOCK = threading.Lock()


def _parse(path: Path) -> ast.Module:
    source = path.read_bytes()
    with _PARSE_LOCK:
        return ast.parse(source, filename=str(path))


def _is_ours(name: str) -> bool:
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


def _reexports(init: Path) -> dict[str, str]:
    """``{name: module}`` for the ``from segflow.x import name`` lines of a package ``__init__``."""
    tree = _parse(init)
    out: dict[str, str] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and _is_ours(node.module)
        ):
            for a in node.names:
                out[a.asname or a.name] = node.module
    return out


def _imports_of(path: Path, root: Path) -> set[str]:
    """The ``segflow`` modules whose code ``path`` uses (lazy imports inside functions count).

    ``from segflow.io.export import write_cog`` is resolved through the package's
    ``__init__`` to the module that defines ``write_cog``.
    """
    tree = _parse(path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if _is_ours(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not _is_ours(node.module):
                continue
            names.add(node.module)
            target = _module_file(node.module, root)
            table = _reexports(target) if target and target.name == "__init__.py" else {}
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if _module_file(sub, root) is not None:  # ``from segflow.io import export``
                    names.add(sub)
                elif a.name in table:  # a name the package re-exports
                    names.add(table[a.name])
                elif a.name == "*":
                    names.update(table.values())
    return names


def module_closure(
    modules: Iterable[str], *, exclude: Iterable[str] = (), root: Path | None = None
) -> tuple[str, ...]:
    """The ``segflow`` modules ``modules`` use, transitively, with their packages (sorted).

    Imports are read from the source (nothing is imported), so lazy imports inside
    functions count too. A package's ``__init__`` counts, but not everything it re-exports:
    only the modules behind the names actually imported from it. Modules in ``exclude``
    (and their submodules) are neither listed nor followed.

    >>> "segflow.io.store" in module_closure(["segflow.ingest"])
    True
    """
    root = root or _package_dir()
    skip = tuple(exclude)

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in skip)

    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or excluded(name):
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        if path.name != "__init__.py":
            todo.extend(_imports_of(path, root) - seen)
    return tuple(sorted(seen))


def code_version(
    modules: Iterable[str], *, exclude: Iterable[str] = (), root: Path | None = None
) -> str:
    """``segflow.__version__`` plus a SHA-256 of the sources of :func:`module_closure`.

    Modules whose edits cannot change outputs (``segflow.errors``) are left out.

    >>> code_version(["segflow.ingest"]).startswith(segflow.__version__ + "+")
    True
    """
    root = root or _package_dir()
    h = hashlib.sha256()
    for name in module_closure(modules, exclude=exclude, root=root):
        if name in _NEUTRAL_MODULES:
            continue
        path = _module_file(name, root)
        assert path is not None  # module_closure only returns modules with a file
        h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"{segflow.__version__}+{h.hexdigest()[:16]}"
