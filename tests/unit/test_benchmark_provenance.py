"""Every raw benchmark JSON says where its numbers came from (issue 17).

A timing in docs/benchmarks.md is only comparable with another when both carry the command, the commit,
the machine and the load it ran under (the development box has 2 cores shared with CI). So every
script in benchmarks/ that writes JSON must do it through ``benchmarks/provenance.py``'s ``write_json``;
the AST check below keeps a new script (or a new ``json.dump``) from quietly writing JSON without it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
#: Options that name a JSON output file (scale.py's --out is a run folder, but it also has --json).
JSON_OPTIONS = {"--json", "--out"}


def _provenance_module() -> ModuleType:
    """benchmarks/ is not a package: load the module by path, as the scripts' own tests do."""
    spec = importlib.util.spec_from_file_location("bench_provenance", BENCHMARKS / "provenance.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _head_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip("not a git checkout: no commit to compare against")
    return done.stdout.strip()


def test_provenance_names_the_commit_the_machine_and_the_load(tmp_path: Path) -> None:
    prov = _provenance_module()
    head = _head_commit()

    started = prov.provenance()
    written = prov.write_json(tmp_path / "deep" / "r.json", {"rows": [{"x": 1.5}]}, started)

    assert re.fullmatch(r"[0-9a-f]{40}", started["commit"]) and started["commit"] == head
    assert isinstance(started["uncommitted_changes"], bool)
    assert started["uncommitted_changes"] == bool(started["uncommitted_files"])
    assert started["machine"]["cores"] > 0
    assert len(started["load_average_start"]) == 3 and all(x >= 0 for x in started["load_average_start"])
    assert started["versions"]["numpy"]  # the libraries that move the numbers are named
    record = json.loads(written.read_text())
    assert record["rows"] == [{"x": 1.5}]
    assert record["provenance"]["commit"] == head
    assert record["provenance"]["load_average_start"] == started["load_average_start"]
    assert len(record["provenance"]["load_average_end"]) == 3
    assert record["provenance"]["finished_utc"] >= record["provenance"]["started_utc"]


def test_write_json_refuses_a_payload_with_no_place_for_the_provenance(tmp_path: Path) -> None:
    prov = _provenance_module()
    started = prov.provenance()
    with pytest.raises(ValueError, match="dict payload"):
        prov.write_json(tmp_path / "a.json", [{"x": 1}], started)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'provenance'"):
        prov.write_json(tmp_path / "b.json", {"provenance": "mine"}, started)
    assert not list(tmp_path.iterdir())


def test_a_benchmark_run_from_elsewhere_writes_its_rows_with_provenance(tmp_path: Path) -> None:
    """The import of provenance works outside the repository's folder and the rows land beside it."""
    head = _head_commit()
    out = tmp_path / "sig.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "secagg_signatures.py"), "--sites", "3",
                           "--params", "1000", "--repeat", "1", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [row["sites"] for row in record["rows"]] == [3]
    assert record["rows"][0]["degree"] == 2 and record["rows"][0]["signed"] > 0
    assert record["provenance"]["commit"] == head
    assert record["provenance"]["command"].endswith(f"--repeat 1 --json {out}")


def _is_json_call(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "json")


def _violations(source: str, where: str) -> list[str]:
    """``where:line why`` for every JSON the script writes itself, and for a JSON option never written
    through ``write_json``."""
    tree = ast.parse(source, filename=where)
    found, options, calls_write_json = [], [], False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        calls_write_json |= called == "write_json"
        if _is_json_call(node, "dump"):
            found.append(f"{where}:{node.lineno} json.dump writes a file without provenance: use write_json")
        if called in {"write_text", "write"} and any(_is_json_call(n, "dumps") for a in node.args
                                                     for n in ast.walk(a)):
            found.append(f"{where}:{node.lineno} {called}(json.dumps(...)) writes JSON without provenance: "
                         "use write_json")
        if called == "add_argument":
            names = {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
            options += [f"{where}:{node.lineno} {o}" for o in sorted(names & JSON_OPTIONS)]
    if options and not calls_write_json:
        found += [f"{o} is never written through provenance.write_json" for o in options]
    return found


def test_every_benchmark_writes_its_json_through_write_json() -> None:
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "provenance.py")
    assert len(scripts) >= 10, f"expected the benchmark scripts in {BENCHMARKS}"
    problems = [v for s in scripts for v in _violations(s.read_text(), s.relative_to(REPO).as_posix())]
    assert problems == [], "\n".join(problems)


def test_the_check_reports_json_written_by_hand_by_line() -> None:
    """The AST check itself: a script with its own json.dumps, json.dump and an unused --json."""
    source = ("import argparse, json\nfrom pathlib import Path\n"
              "p = argparse.ArgumentParser()\np.add_argument('--json')\n"
              "Path('x').write_text(json.dumps({}))\njson.dump({}, open('y', 'w'))\nprint(json.dumps({}))\n")

    problems = _violations(source, "benchmarks/bad.py")

    assert problems == [
        "benchmarks/bad.py:5 write_text(json.dumps(...)) writes JSON without provenance: use write_json",
        "benchmarks/bad.py:6 json.dump writes a file without provenance: use write_json",
        "benchmarks/bad.py:4 --json is never written through provenance.write_json",
    ]
    assert _violations(source.replace("--json", "--rounds").replace("Path('x').write_text(json.dumps({}))\n", "")
                       .replace("json.dump({}, open('y', 'w'))\n", ""), "ok.py") == []
