"""What ``pip install fedfusion`` brings must match what the code imports, and a hospital site must not get Ray.

pyproject.toml's core dependencies are what a hospital site (and the coordinator) needs; the research
tooling lives in extras (``simulation`` = Flower's Ray runtime + lifelines, ``datasets``, ``tracking``,
``export``). Nothing keeps that true by itself: one new top-level ``import lifelines`` in a module the
ClientApp loads and every site install breaks at start-up; one forgotten declaration and a fresh install
fails where the developer's full venv did not. These tests read the source with ``ast`` (no import of
the code under test) and pyproject.toml, and check them against each other and against the installed
distributions' metadata.

The rule, kept simple so a failure is easy to act on:

* a module the site runs (everything under ``fedfusion/``, ``common/``, ``client/``, ``server/``, and any
  ``simulations/`` module those import at module level, such as ``scale_sites``) may import at module level
  only **core** dependencies;
* the other ``simulations/`` modules (``fedfusion simulate``, studies, baselines) may also use the
  ``simulation`` extra at module level;
* an import inside a function (lazy) may use an extra only if :data:`LAZY_EXTRAS` names that extra for it:
  the table is the list of features a lean install does not have, and the extra that adds each one.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement

from fedfusion.common.config import Schema

REPO = Path(__file__).resolve().parents[2]

# Lazily imported modules (inside the function that needs them) and the extra that installs them.
LAZY_EXTRAS: dict[str, str] = {
    "lifelines": "simulation",     # survival baselines, Kaplan-Meier plots, the NCCTG lung data
    "sksurv": "datasets",          # scikit-survival baselines (GPL)
    "SurvSet": "datasets",         # ovarian / breast-cohorts data (GPL)
    "flwr_datasets": "datasets",   # Dirichlet and continuous partitioners
    "datasets": "datasets",        # the Hugging Face Dataset those partitioners read
    "tensorboard": "tracking",
    "mlflow": "tracking",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "ray": "simulation",           # hiding Ray's forwarded actor-shutdown line (simulations/runtime_notices.py)
}

# Core dependencies the code never imports itself, and why they are declared anyway.
NOT_IMPORTED: dict[str, str] = {
    "torchvision": "timm's image models import it; declared as a range so pip pairs it with torch",
}

# Module-level imports a simulations/-only module may use besides the core.
SIMULATION_EXTRA = "simulation"


def _norm(name: str) -> str:
    """PEP 503 name, so 'PyYAML', 'pyyaml' and 'py_yaml' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@cache
def _declared() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(core distribution names, extra -> distribution names), self-references (fedfusion[a,b]) expanded."""
    core = frozenset(_norm(Requirement(r).name) for r in _project()["dependencies"])
    raw = {extra: [Requirement(r) for r in reqs] for extra, reqs in _project()["optional-dependencies"].items()}

    def expand(extra: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        names: set[str] = set()
        for req in raw[extra]:
            if _norm(req.name) == "fedfusion":
                for inner in req.extras - seen:
                    names |= expand(inner, seen | {extra})
            else:
                names.add(_norm(req.name))
        return frozenset(names)

    return core, {extra: expand(extra) for extra in raw}


@dataclass(frozen=True)
class _Import:
    where: str        # "client/runtime.py:72", for the failure message
    importer: str     # "fedfusion.client.runtime"
    name: str         # the imported module, absolute: "flwr.app", "fedfusion.common.config"
    module_level: bool  # runs when the importer is imported (not inside a function, not TYPE_CHECKING)


def _package_folders() -> dict[str, str]:
    """folder on disk -> installed package name, from pyproject's package-dir mapping."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items()}


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(REPO)
    package = _package_folders()[rel.parts[0]]
    parts = [package, *rel.parts[1:-1]]
    is_package = rel.name == "__init__.py"
    if not is_package:
        parts.append(rel.stem)
    return ".".join(parts), is_package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _string_import(node: ast.Call) -> str | None:
    """``importlib.import_module("x")`` / ``_require("x", ...)``: a module named by a literal."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in ("import_module", "_require") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def _imports_of(path: Path) -> list[_Import]:
    module, is_package = _module_name(path)
    base = module.split(".") if is_package else module.split(".")[:-1]
    rel = path.relative_to(REPO).as_posix()
    found: list[_Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, module_level)
            return  # typing-only names: never imported at run time
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
            head = ".".join(p for p in (prefix, node.module or "") if p)
            names = [head] + [f"{head}.{alias.name}" for alias in node.names]  # submodules, if any
        elif isinstance(node, ast.Call) and (literal := _string_import(node)):
            names = [literal]
        for name in names:
            found.append(_Import(f"{rel}:{node.lineno}", module, name, module_level))  # type: ignore[attr-defined]
        inside = module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=rel), True)
    return found


@cache
def _imports() -> tuple[_Import, ...]:
    return tuple(imp for folder in _package_folders() for path in sorted((REPO / folder).rglob("*.py"))
                 for imp in _imports_of(path))


@cache
def _own_modules() -> frozenset[str]:
    return frozenset(_module_name(path)[0] for folder in _package_folders()
                     for path in (REPO / folder).rglob("*.py"))


def _site_modules() -> frozenset[str]:
    """Modules a site or coordinator loads: all of fedfusion/common/client/server, plus whatever they import
    at module level (parent packages included, as Python runs their __init__ first)."""
    own = _own_modules()
    site_roots = ("fedfusion.common", "fedfusion.client", "fedfusion.server")
    todo = [m for m in own if m == "fedfusion" or m.startswith(("fedfusion.cli",) + site_roots)]
    edges: dict[str, set[str]] = {}
    for imp in _imports():
        if imp.module_level and imp.name in own:
            edges.setdefault(imp.importer, set()).add(imp.name)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(edges.get(module, ()))
    return frozenset(seen)


def _third_party(name: str) -> str | None:
    top = name.split(".")[0]
    if not top or top in sys.stdlib_module_names or top in ("fedfusion", "__future__"):
        return None
    return top


@cache
def _top_level_to_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()  # scans every installed distribution's file list: once


def _distribution(top: str) -> str | None:
    dists = _top_level_to_distributions().get(top)
    return _norm(dists[0]) if dists else None


def _problems(imports: tuple[_Import, ...], site: frozenset[str]) -> list[str]:
    """One line per import that breaks the module docstring's rule, naming file:line and the fix."""
    core, extras = _declared()
    problems: dict[str, None] = {}  # ordered, and `from x import a, b` reports its line once
    for imp in imports:
        top = _third_party(imp.name)
        if top is None:
            continue
        dist = _distribution(top)
        if dist is None:
            problem = (f"imports {top!r}, which no installed distribution provides (declare it in pyproject.toml "
                       "and install it)")
        elif dist in core:
            continue
        elif imp.module_level and imp.importer in site:
            problem = (f"imports {top!r} ({dist}) at module level on the site path: make it a core dependency or "
                       "import it inside the function that needs it")
        elif imp.module_level:
            if dist in extras[SIMULATION_EXTRA]:
                continue
            problem = f"imports {top!r} ({dist}) at module level; declare it in core or the {SIMULATION_EXTRA!r} extra"
        elif top not in LAZY_EXTRAS:
            problem = (f"imports {top!r} ({dist}) lazily; it is not core: add it to LAZY_EXTRAS in "
                       "tests/unit/test_packaging.py with the extra that installs it")
        elif dist not in extras.get(LAZY_EXTRAS[top], frozenset()):
            problem = f"imports {top!r} ({dist}); the {LAZY_EXTRAS[top]!r} extra does not declare it"
        else:
            continue
        problems.setdefault(f"{imp.where}: {problem}")
    return list(problems)


def test_every_third_party_import_is_declared_where_its_layer_needs_it() -> None:
    site = _site_modules()
    assert "fedfusion.simulations.scale_sites" in site  # the ClientApp's runtime imports it: the walk must see it
    assert "fedfusion.simulations.simulate" not in site
    problems = _problems(_imports(), site)
    assert not problems, "\n".join(problems)


def test_the_rule_refuses_ray_or_lifelines_on_the_site_path_and_undeclared_lazy_imports() -> None:
    site = frozenset({"fedfusion.client.x"})
    cases = [
        _Import("client/x.py:1", "fedfusion.client.x", "lifelines", True),        # site path, module level
        _Import("simulations/y.py:2", "fedfusion.simulations.y", "lifelines", True),  # simulation extra: fine
        _Import("simulations/y.py:3", "fedfusion.simulations.y", "mlflow", True),     # tracking at module level
        _Import("client/x.py:4", "fedfusion.client.x", "pytest", False),             # lazy, not in LAZY_EXTRAS
        _Import("client/x.py:5", "fedfusion.client.x", "onnx", False),               # lazy, export extra: fine
        _Import("client/x.py:6", "fedfusion.client.x", "torch.nn", True),            # core
        _Import("client/x.py:7", "fedfusion.client.x", "no_such_module_xyz", False),
    ]
    problems = _problems(tuple(cases), site)
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in problems] == [
        "client/x.py:1", "simulations/y.py:3", "client/x.py:4", "client/x.py:7"]
    assert "on the site path" in problems[0] and "LAZY_EXTRAS" in problems[2]


def test_the_walk_reads_module_level_lazy_and_relative_imports_as_python_runs_them() -> None:
    by_where = {imp.where: imp for imp in _imports()}
    runtime = [imp for imp in _imports() if imp.importer == "fedfusion.client.runtime"
               and imp.name == "fedfusion.simulations.scale_sites"]
    assert runtime and runtime[0].module_level
    relative = [imp for imp in _imports() if imp.importer == "fedfusion.common.models.model"
                and imp.name == "fedfusion.common.config"]
    assert relative and relative[0].module_level
    lazy_survset = [imp for imp in by_where.values() if imp.name == "SurvSet.data"]
    assert lazy_survset and not lazy_survset[0].module_level  # _require("SurvSet.data", ...) inside a function
    typing_only = [imp for imp in _imports() if imp.where.startswith("common/privacy.py:")
                   and imp.name.startswith("opacus") and imp.module_level]
    assert not typing_only  # `if TYPE_CHECKING:` imports never run


def test_every_core_dependency_is_imported_or_has_a_reason() -> None:
    core, _ = _declared()
    imported = {_distribution(top) for imp in _imports() if (top := _third_party(imp.name))}
    unused = sorted(core - imported - set(NOT_IMPORTED))
    assert not unused, (f"core dependencies nothing imports: {unused}; drop them from pyproject.toml or give "
                        "the reason in NOT_IMPORTED")
    assert set(NOT_IMPORTED) <= core, "NOT_IMPORTED names a distribution that is no longer a core dependency"


def _closure(extras: set[str]) -> tuple[set[str], set[str]]:
    """Distributions pip installs for fedfusion[extras], resolved from pyproject (the root) and the installed
    distributions' metadata (everything below it); markers evaluated for this platform and the extras asked.
    Returns (names, names required here but not installed)."""
    found: set[str] = set()
    missing: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = []

    def take(requirements: list[str], active: set[str]) -> None:
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in active | {""}):
                continue
            name = _norm(req.name)
            if name == "fedfusion":
                take_root(set(req.extras))
            else:
                todo.append((name, frozenset(req.extras)))

    def take_root(asked: set[str]) -> None:
        take(list(_project()["dependencies"]), set())
        for extra in asked:
            take(list(_project()["optional-dependencies"][extra]), set())

    take_root(extras)
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, asked = todo.pop()
        if (name, asked) in done:
            continue
        done.add((name, asked))
        found.add(name)
        try:
            requirements = md.requires(name) or []
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        take(requirements, set(asked))
    return found, missing


def test_a_site_install_resolves_without_ray_or_lifelines_and_simulation_brings_ray() -> None:
    site, missing = _closure({"site"})
    assert not missing, f"site dependencies not installed here: {sorted(missing)}"
    assert {"flwr", "torch", "opacus", "cryptography", "grpcio"} <= site  # grpcio comes through Flower
    assert "ray" not in site and "lifelines" not in site, sorted(site)
    simulation, _ = _closure({"simulation"})
    assert {"ray", "lifelines"} <= simulation
    assert site < simulation


# --------------------------------------------------------------------------- the site path without Ray


_BLOCKED_PROBE = textwrap.dedent("""
    import importlib.abc, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
        '''As if `pip install "fedfusion[site]"`: Ray and lifelines are absent.'''
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "lifelines"):
                raise ImportError(f"No module named {name!r} (blocked: a site install has no Ray)")
            return None

    sys.meta_path.insert(0, NotInstalled())
    import importlib
    for module in ("fedfusion.client.app", "fedfusion.server.app", "fedfusion.client.daemon",
                   "fedfusion.client.dashboard", "fedfusion.server.coordinator", "fedfusion.server.dashboard"):
        importlib.import_module(module)
    from fedfusion.cli import main
    print("SITE_CHECK", main(["site", "check", sys.argv[1], "--schema", sys.argv[2]]))
    print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & {"ray", "lifelines"}))
    # the research commands a site user might still try: one line naming the extra, no traceback
    print("SIMULATE", main(["simulate", "--dataset", "ovarian", "--rounds", "1", "--out", "sim"]))
    print("LUNG", main(["datasets", "build", "lung", "lung"]))
""")


def test_the_site_path_runs_without_ray_or_lifelines(site: Path, schema: Schema, tmp_path: Path) -> None:
    manifest = site / "manifest.csv" if site.is_dir() else site
    schema_path = schema.save(tmp_path / "schema.json")
    done = subprocess.run([sys.executable, "-c", _BLOCKED_PROBE, str(manifest), str(schema_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "SITE_CHECK 0" in done.stdout
    assert "rows" in done.stdout and "modality coverage" in done.stdout  # site check's summary was printed
    assert "LOADED []" in done.stdout
    assert "SIMULATE 2" in done.stdout and "LUNG 2" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all('pip install "fedfusion[simulation]"' in line for line in errors), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "sim").exists()  # refused before anything was written


def test_licence_changelog_and_version_agree_with_pyproject() -> None:
    """A release bump must touch all three: pyproject's version, fedfusion.__version__ (read by the FAB copy,
    which has no metadata) and a CHANGELOG section; the LICENSE file is the licence pyproject declares."""
    import fedfusion

    version = _project()["version"]
    assert fedfusion.__version__ == version
    assert f"## [{version}] - " in (REPO / "CHANGELOG.md").read_text()
    assert _project()["license"] == {"text": "Apache-2.0"}
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("Copyright 2026 the fedfusion authors\n")
    assert "Apache License\n                           Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
