"""Imports point down only. The floors, top to bottom:

    5  strata.app                        (and `strata` itself, the public face: it re-exports LLM)
    4  strata.actors, strata.placement   (side by side: neither imports the other)
    3  strata.model
    2  strata.distributed
    1  the records at strata's root: strata.config, strata.sampling_params (and its
       strata.structured_outputs), strata.outputs,
       strata.model_facts, strata.engine_protocol

A module may import from its own floor or any floor below. strata/__init__.py is exempt (it
lazily imports strata.app.llm.LLM); strata.app.server imports nothing from strata.actors or
strata.placement (it talks to the engine through strata.app's handle). No module of the package
imports the source folders by their bare names (`app`, `actors`, `model`, `placement`): those
only resolve from a checkout, never from an installed wheel.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, `import x` and
`from x import y`, absolute and relative. Modules are read as source (ast), so nothing is imported.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FLOOR_NAMES = {5: "app", 4: "actors/placement", 3: "model", 2: "distributed", 1: "records"}
RECORDS = ("config", "sampling_params", "structured_outputs", "outputs", "model_facts", "engine_protocol")
SUBPACKAGE_FLOORS = {"app": 5, "actors": 4, "placement": 4, "model": 3, "distributed": 2}
SIBLINGS = ("strata.actors", "strata.placement")  # one floor, and neither imports the other
EXEMPT = {"strata"}  # the public face
BARE_NAMES = ("app", "actors", "model", "placement")
# The installed package's roots; each maps to its source folder through the install (editable or not).
ROOTS = ("strata", "strata.app", "strata.actors", "strata.model", "strata.placement")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. strata.actors.driver
    file: Path
    line: int
    target: str  # what it imports, absolute, e.g. strata.app.model_source

    def where(self) -> str:
        try:
            return f"{self.file.relative_to(REPO)}:{self.line}"
        except ValueError:
            return f"{self.file}:{self.line}"


def floor_of(module: str) -> int | None:
    """The floor of a strata module; None when it is not strata's; -1 when it is on no floor."""
    parts = module.split(".")
    if parts[0] != "strata":
        return None
    if len(parts) == 1:
        return 5  # the public face: importing it pulls in strata.app
    if parts[1] in SUBPACKAGE_FLOORS:
        return SUBPACKAGE_FLOORS[parts[1]]
    if parts[1] in RECORDS:
        return 1
    return -1


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def package_modules() -> dict[str, Path]:
    """Every module of the installed package: strata.* name -> its source file."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None and spec.submodule_search_locations, f"{root} is not an installed package"
        for base in map(Path, spec.submodule_search_locations):
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(base).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                if any(not p.isidentifier() for p in parts):
                    continue  # not importable (a stray script)
                found.setdefault(".".join([root, *parts]), path)
    return found


def imports_of(module: str, path: Path, source: str | None = None) -> list[Import]:
    """Every import in `path`'s source, at any depth, with targets made absolute."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base == "strata":
                # `from strata import config` imports the record strata.config; `from strata import LLM`
                # imports the public face.
                out += [Import(module, path, node.lineno,
                               f"strata.{a.name}" if floor_of(f"strata.{a.name}") not in (-1, 5) else "strata")
                        for a in node.names]
            elif node.level and not node.module:  # `from . import x`: each x is a module of `base`
                out += [Import(module, path, node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                out.append(Import(module, path, node.lineno, base))
    return sorted(out, key=lambda i: i.line)


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_modules()


@pytest.fixture(scope="module")
def all_imports(modules) -> list[Import]:
    return [imp for name, path in sorted(modules.items()) for imp in imports_of(name, path)]


def upward(imp: Import) -> str | None:
    """Why `imp` breaks the floors, or None."""
    if imp.module in EXEMPT:
        return None
    mine, theirs = floor_of(imp.module), floor_of(imp.target)
    if theirs is None:
        return None
    if theirs == -1:
        return f"{imp.target} is on no floor"
    if theirs > mine:
        return (f"{imp.module} ({FLOOR_NAMES[mine]}, floor {mine}) imports {imp.target} "
                f"({FLOOR_NAMES[theirs]}, floor {theirs})")
    for a, b in (SIBLINGS, SIBLINGS[::-1]):
        if in_package(imp.module, a) and in_package(imp.target, b):
            return f"{imp.module} imports {imp.target}: {a} and {b} stand side by side"
    return None


def report(violations: list[str], what: str = "break the floors") -> str:
    return f"{len(violations)} import(s) {what}:\n  " + "\n  ".join(violations)


def test_every_module_is_on_a_floor(modules):
    assert len(modules) > 40, sorted(modules)  # the walk found the package, not an empty folder
    for name in ("strata.app.llm", "strata.actors.executor", "strata.placement.placement",
                 "strata.model.loader", "strata.distributed.rank_layout", "strata.config"):
        assert name in modules, name
    assert [m for m in modules if floor_of(m) == -1] == []


def test_imports_point_down_only(all_imports):
    violations = [f"{imp.where()}: {why}" for imp in all_imports if (why := upward(imp))]
    assert not violations, report(violations)


def test_the_server_does_not_reach_past_the_app(all_imports):
    violations = [f"{imp.where()}: {imp.module} imports {imp.target}" for imp in all_imports
                  if in_package(imp.module, "strata.app.server")
                  and any(in_package(imp.target, p) for p in ("strata.actors", "strata.placement"))]
    assert not violations, report(violations)


def test_no_bare_source_folder_imports(all_imports):
    """`import model` works from a checkout only; an installed wheel has strata.model."""
    extra = []  # the tests and benchmarks run from a checkout, where a bare name would still resolve
    for folder in ("tests", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            extra += imports_of(f"{folder}.{path.stem}", path)
    violations = [f"{imp.where()}: {imp.module} imports {imp.target}" for imp in [*all_imports, *extra]
                  if imp.target.split(".")[0] in BARE_NAMES]
    assert not violations, report(violations, "name a source folder instead of its strata package")


def test_test_helpers_import_under_one_name():
    """tests/ is a package: its helpers import as `tests.model_factory`, never as `model_factory`
    (which, where it resolves, is a second copy of the module with its own globals)."""
    helpers = {path.stem for path in (REPO / "tests").glob("*.py")}
    violations = [f"{imp.where()}: import {imp.target} as tests.{imp.target}"
                  for path in sorted((REPO / "tests").glob("*.py"))
                  for imp in imports_of(f"tests.{path.stem}", path)
                  if imp.target.split(".")[0] in helpers]
    assert not violations, report(violations, "name a test helper without its package")


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The collector itself: function-level, TYPE_CHECKING, relative and `from strata import`."""
    path = tmp_path / "engine_core.py"
    source = (
        "from typing import TYPE_CHECKING\n"
        "import strata.model.loader\n"
        "from strata import config, LLM\n"
        "from . import scheduler\n"
        "from ..worker.rank import RankWorker\n"
        "if TYPE_CHECKING:\n"
        "    from strata.app.output import processor\n"
        "def f():\n"
        "    import app.llm\n"
    )
    got = [(i.line, i.target) for i in imports_of("strata.actors.engine.engine_core", path, source)]
    assert got == [(1, "typing"), (2, "strata.model.loader"), (3, "strata.config"), (3, "strata"),
                   (4, "strata.actors.engine.scheduler"), (5, "strata.actors.worker.rank"),
                   (7, "strata.app.output"), (9, "app.llm")]
    imports = imports_of("strata.actors.engine.engine_core", path, source)
    assert [i.line for i in imports if upward(i)] == [3, 7]  # the public face, and strata.app
    assert upward(Import("strata.placement.placement", path, 1, "strata.actors.executor"))
    assert upward(Import("strata.distributed.channel", path, 1, "strata.actors.nodes.node_address"))
    assert upward(Import("strata", path, 1, "strata.app.llm")) is None  # the exempt public face
    assert upward(Import("strata.model.loader", path, 1, "strata.distributed.process_groups")) is None
