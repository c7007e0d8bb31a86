"""Tests reach Flower's internals only through the adapter, so a Flower upgrade is fixed in one place.

Why: tests that set ``TaskIdentity`` themselves or call ``flwr.common.serde`` break, each on its own, when
Flower moves those internals; ``fedfusion.common.flower_adapter`` offers ``message_identity`` (and the
``flower_task_identity`` fixture in tests/conftest.py), ``serialized_size`` and ``roundtrip`` instead,
each with a canary in tests/unit/test_flower_canaries.py (the one test file allowed to import them).
"""

from __future__ import annotations

import ast
import functools
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
#: The canaries check the internals themselves, so they must import them.
CANARIES = "tests/unit/test_flower_canaries.py"
#: Internal modules tests must not import (any submodule counts).
BANNED = ("flwr.supercore", "flwr.common.serde")
#: The class whose process-global ids ``message_identity`` sets and restores.
BANNED_NAME = "TaskIdentity"
#: Uses the adapter has no equivalent for yet (test file -> exact modules). Each entry must still occur,
#: so this list only shrinks: drop a line when the file moves to the adapter.
PENDING: dict[str, frozenset[str]] = {
    # A whole Message deflated to Flower's object tree and inflated back (what crosses the wire since 1.41);
    # the adapter's ``roundtrip`` covers one RecordDict's protobuf, not a Message's object tree.
    "tests/unit/client/test_audit_mod.py": frozenset({"flwr.supercore.inflatable.inflatable_object",
                                                      "flwr.supercore.inflatable.inflatable_utils"}),
    "tests/unit/common/test_reply_digest.py": frozenset({"flwr.supercore.inflatable.inflatable_object",
                                                         "flwr.supercore.inflatable.inflatable_utils"}),
    # The error Flower's object pull raises, as the SuperNode's and the Grid's pull backoff see it.
    "tests/pull_fakes.py": frozenset({"flwr.supercore.inflatable.inflatable_utils"}),
    # The SuperExec types the warm executor implements (fedfusion.client.flower_runtime imports them too).
    "tests/unit/client/test_warm_executor.py": frozenset({"flwr.supercore.constant",
                                                          "flwr.supercore.superexec.executor"}),
    # Flower's real task input (a PullTaskInputResponse built with its serde) for a stand-in Runtime API client.
    "tests/unit/client/test_prepare_app.py": frozenset({"flwr.common.serde", "flwr.supercore.fab",
                                                        "flwr.supercore.run"}),
    # Flower's own deprecation warning, raised for real so the filter is tested on Flower's text.
    "tests/unit/simulations/test_runtime_notices.py": frozenset({"flwr.supercore.logger"}),
}


def _is_banned(module: str) -> bool:
    return any(module == banned or module.startswith(banned + ".") for banned in BANNED)


def internal_uses(source: str, rel: str) -> list[tuple[int, str, str]]:
    """(line, module or name, ``rel:line: what``) for each banned import or ``TaskIdentity`` reference.

    Catches ``import a.b``, ``from a import b`` (also when ``b`` is the banned submodule, e.g.
    ``from flwr.common import serde``), ``importlib.import_module("...")``/``__import__("...")`` with a
    literal, and ``TaskIdentity`` as an imported name, a bare name or an attribute (``x.TaskIdentity``).
    Strings and comments that merely mention them are not uses.
    """
    found: list[tuple[int, str, str]] = []

    def add(line: int, what: str, why: str) -> None:
        found.append((line, what, f"{rel}:{line}: {why}"))

    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # The module itself, or (``from flwr.common import serde``) the banned submodules it names.
            modules = [node.module] if _is_banned(node.module) else [f"{node.module}.{a.name}" for a in node.names]
            if any(alias.name == BANNED_NAME for alias in node.names):
                add(node.lineno, BANNED_NAME, f"imports {BANNED_NAME} from {node.module} "
                                              "(use fedfusion.common.flower_adapter.message_identity)")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            modules = [node.args[0].value]
        elif isinstance(node, ast.Name) and node.id == BANNED_NAME:
            add(node.lineno, BANNED_NAME, f"references {BANNED_NAME} (use message_identity or the "
                                          "flower_task_identity fixture)")
        elif isinstance(node, ast.Attribute) and node.attr == BANNED_NAME:
            add(node.lineno, BANNED_NAME, f"references .{BANNED_NAME} (use message_identity or the "
                                          "flower_task_identity fixture)")
        for module in filter(_is_banned, modules):
            add(node.lineno, module, f"imports Flower internal {module} (use fedfusion.common.flower_adapter)")
    return sorted(found)


@functools.cache  # both tests below read the same scan
def _scan() -> tuple[int, list[str], dict[str, set[str]]]:
    """(files scanned, violations outside PENDING, the PENDING modules actually found per file)."""
    scanned, violations, pending_seen = 0, [], {}
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == CANARIES:
            continue
        scanned += 1
        for _, what, message in internal_uses(path.read_text(encoding="utf-8"), rel):
            if what in PENDING.get(rel, frozenset()):
                pending_seen.setdefault(rel, set()).add(what)
            else:
                violations.append(message)
    return scanned, violations, pending_seen


def test_no_test_uses_flower_internals_outside_the_canaries() -> None:
    scanned, violations, _ = _scan()
    assert scanned > 100  # the whole tests tree, not an empty glob
    assert not violations, "Flower internals in tests (go through fedfusion.common.flower_adapter):\n" + \
        "\n".join(violations)


def test_every_pending_exception_is_still_needed() -> None:
    _, _, seen = _scan()
    stale = sorted(f"{rel}: {module}" for rel, modules in PENDING.items()
                   for module in modules - seen.get(rel, set()))
    assert not stale, "no longer used; remove from PENDING in tests/unit/test_tests_use_adapter.py:\n" + \
        "\n".join(stale)


def test_the_scan_catches_each_form_and_names_file_and_line() -> None:
    source = textwrap.dedent('''\
        """Mentions flwr.supercore.task_identity.TaskIdentity in a docstring: not a use."""
        import importlib
        from flwr.app import Message
        from flwr.common import ConfigRecord
        from fedfusion.common.flower_adapter import message_identity, roundtrip
        from flwr.supercore.task_identity import TaskIdentity
        import flwr.supercore.logger as flog
        from flwr.common.serde import recorddict_to_proto
        from flwr.common import serde
        from flwr import supercore
        mod = importlib.import_module("flwr.common.serde")
        old = __import__("flwr.supercore.constant")
        def f(adapter):
            TaskIdentity._run_id = 5
            return adapter.TaskIdentity
        ''')
    found = internal_uses(source, "tests/bad.py")
    assert [(line, what) for line, what, _ in found] == [
        (6, "TaskIdentity"), (6, "flwr.supercore.task_identity"), (7, "flwr.supercore.logger"),
        (8, "flwr.common.serde"), (9, "flwr.common.serde"), (10, "flwr.supercore"),
        (11, "flwr.common.serde"), (12, "flwr.supercore.constant"), (14, "TaskIdentity"), (15, "TaskIdentity")]
    assert found[0][2] == ("tests/bad.py:6: imports TaskIdentity from flwr.supercore.task_identity "
                           "(use fedfusion.common.flower_adapter.message_identity)")
    assert found[2][2] == "tests/bad.py:7: imports Flower internal flwr.supercore.logger " \
                          "(use fedfusion.common.flower_adapter)"
    assert internal_uses("from flwr.app import RecordDict\nimport flwr.common\n", "tests/ok.py") == []
