"""The warm SuperExec's executor: forks a task process per ClientApp task, reaps it, refuses others."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedfusion.client import warm_executor
from fedfusion.client.warm_executor import ForkingExecutor


def _spec(task_type: TaskType = TaskType.CLIENT_APP, token: str = "tok-1") -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=7)


def _reap_all(executor: ForkingExecutor, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while executor._children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.02)


def test_each_task_runs_flowers_clientapp_in_a_forked_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = tmp_path / "seen"

    def fake_run_clientapp(**kwargs: object) -> None:
        # Runs in the child: prove it got the task's token and is not the test process, and that
        # Flower's object pull retries fast (objects arrive while the SuperNode still stores them).
        pull = flower_module.pull_and_inflate_object_from_tree
        backoff = getattr(pull, "keywords", {}).get("initial_backoff")
        seen.with_suffix(f".{kwargs['token']}").write_text(f"{os.getpid()} {os.getppid()} {backoff}")
        raise SystemExit(0)

    import flwr.supernode.runtime.run_clientapp as flower_module

    monkeypatch.setattr(flower_module, "run_clientapp", fake_run_clientapp)
    executor = ForkingExecutor()
    for token in ("a", "b"):
        assert executor.launch(_spec(token=token)).status == LaunchResultStatus.ACCEPTED
    _reap_all(executor)
    assert executor._children == set()
    for token in ("a", "b"):
        child, parent, backoff = seen.with_suffix(f".{token}").read_text().split()
        assert int(parent) == os.getpid() and int(child) != os.getpid()
        assert float(backoff) == warm_executor.OBJECT_PULL_INITIAL_BACKOFF_S


def test_only_clientapp_tasks_are_accepted() -> None:
    executor = ForkingExecutor()
    result = executor.launch(_spec(task_type=TaskType.SERVER_APP))
    assert result.status == LaunchResultStatus.FAILED and "ClientApps only" in (result.message or "")
    types, _ = executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP})
    assert types == {TaskType.CLIENT_APP}


def test_a_failing_child_is_reaped_and_does_not_return_into_the_loop(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    marker = tmp_path / "returned"

    def crash(**_: object) -> None:
        raise RuntimeError("boom")

    import flwr.supernode.runtime.run_clientapp as flower_module

    monkeypatch.setattr(flower_module, "run_clientapp", crash)
    executor = ForkingExecutor()
    executor.launch(_spec())
    if os.getpid() != executor_pid:  # pragma: no cover - would only run if the child fell through
        marker.write_text("child returned from launch()")
        os._exit(0)
    _reap_all(executor)
    assert not marker.exists() and executor._children == set()


executor_pid = os.getpid()


def test_preload_reports_missing_modules() -> None:
    assert warm_executor.preload(["json", "no_such_module_fedfusion"]) == ["no_such_module_fedfusion"]


def test_preloaded_modules_do_not_include_fedfusion() -> None:
    # fedfusion's own code must come from the run's FAB in the child, never from the warm parent.
    assert not any(name.startswith("fedfusion") for name in warm_executor.PRELOADED_MODULES)
