"""A task process installs and imports the run's app while its message is still arriving, not after it.

Flower's real task input (protobuf response, serde) and module names are used; only the network (the
Runtime API client) and the two heavy steps (install, import) are stand-ins that record when and where
they ran.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedfusion.client import flower_runtime

FAB_HASH = "ab" * 32
MESSAGE_DELAY_S = 0.3


class _Client:
    """The Runtime API client as ``pull_task_input`` sees it: the task input at once, the message later."""

    def __init__(self) -> None:
        from flwr.common.serde import context_to_proto, fab_to_proto, run_to_proto
        from flwr.proto.runtime_pb2 import PullTaskInputResponse
        from flwr.supercore.fab import Fab
        from flwr.supercore.run import Run

        context = Context(run_id=7, node_id=3, node_config={"site-id": "A", "manifest": "/data/a.csv"},
                          state=RecordDict(), run_config={"local-epochs": 2})
        run = replace(Run.create_empty(7), fab_id="fedfusion/fedfusion", fab_version="0.1.0", fab_hash=FAB_HASH)
        self.response = PullTaskInputResponse(context=context_to_proto(context), run=run_to_proto(run),
                                              fab=fab_to_proto(Fab(FAB_HASH, b"zip-bytes", {})))
        self.closed = False

    def PullTaskInput(self, request: object) -> Any:  # noqa: N802 - Flower's method name
        return self.response

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def task_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Flower's task module with its install/load/pull names restored after the test."""
    module = flower_runtime.run_clientapp_module()
    for name in (flower_runtime.PULL_TASK_INPUT_NAME, flower_runtime.INSTALL_NAME,
                 flower_runtime.LOADER_FACTORY_NAME):
        monkeypatch.setattr(module, name, getattr(module, name))
    return module


def _stand_ins(module: Any, monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str, float]],
               install_error: BaseException | None = None) -> object:
    app = object()

    def pull_task_input(client: Any) -> str:  # Flower's order: task input, then the message's objects
        from flwr.proto.runtime_pb2 import PullTaskInputRequest

        client.PullTaskInput(PullTaskInputRequest())
        time.sleep(MESSAGE_DELAY_S)
        events.append(("message", threading.current_thread().name, time.monotonic()))
        client.close()  # every other call goes to the real client
        return "message"

    def install(content: bytes, skip_prompt: bool = False) -> Path:
        events.append(("install", threading.current_thread().name, time.monotonic()))
        assert content == b"zip-bytes" and skip_prompt
        if install_error is not None:
            raise install_error
        return Path("/apps/fedfusion")

    def loader_factory(**kwargs: Any) -> Any:
        assert kwargs == {"default_app_ref": "", "app_path": None, "multi_app": True}

        def load(fab_id: str, fab_version: str, fab_hash: str) -> object:
            events.append((f"load {fab_hash[:4]}", threading.current_thread().name, time.monotonic()))
            return app

        return load

    monkeypatch.setattr(module, flower_runtime.PULL_TASK_INPUT_NAME, pull_task_input)
    monkeypatch.setattr(module, flower_runtime.INSTALL_NAME, install)
    monkeypatch.setattr(module, flower_runtime.LOADER_FACTORY_NAME, loader_factory)
    return app


def test_install_import_and_warm_up_run_while_the_message_arrives(task_module: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str, float]] = []
    app = _stand_ins(task_module, monkeypatch, events)
    warmed: list[tuple[dict[str, Any], dict[str, Any], object]] = []

    def warm_up(context: Context, client_app: object) -> None:
        time.sleep(0.05)
        warmed.append((dict(context.node_config), dict(context.run_config), client_app))

    flower_runtime.prepare_app_while_message_arrives(warm_up)
    client = _Client()
    began = time.monotonic()
    assert task_module.pull_task_input(client) == "message" and client.closed
    # Then Flower's task body installs and loads, exactly as it calls them: both answer from the preparation.
    assert task_module.install_from_fab(b"zip-bytes", skip_prompt=True) == Path("/apps/fedfusion")
    load = task_module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert load("fedfusion/fedfusion", "0.1.0", FAB_HASH) is app
    done = time.monotonic()
    names = [name for name, _, _ in events]
    assert names == ["install", "load abab", "message"]  # each once, before the message was in
    assert {thread for name, thread, _ in events if name != "message"} == {"fedfusion-prepare-app"}
    assert events[1][2] - began < MESSAGE_DELAY_S
    assert done - began < MESSAGE_DELAY_S + 0.25  # the warm-up overlapped the wait too
    assert warmed == [({"site-id": "A", "manifest": "/data/a.csv"}, {"local-epochs": 2}, app)]
    # Another bundle than the prepared one is loaded by the loader itself, never answered from the cache.
    assert load("fedfusion/fedfusion", "0.1.0", "cd" * 32) is app
    assert [name for name, _, _ in events][-1] == "load cdcd"


def test_a_refused_bundle_fails_where_flowers_install_would(task_module: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str, float]] = []
    refusal = PermissionError("bundle sha256=abab... is not approved")
    _stand_ins(task_module, monkeypatch, events, install_error=refusal)
    flower_runtime.prepare_app_while_message_arrives(lambda context, app: None)
    assert task_module.pull_task_input(_Client()) == "message"  # the message itself still arrives
    with pytest.raises(PermissionError) as raised:
        task_module.install_from_fab(b"zip-bytes", skip_prompt=True)
    assert raised.value is refusal
    assert [name for name, _, _ in events] == ["install", "message"]  # nothing imported from a refused bundle


def test_a_failing_warm_up_is_left_to_the_handler(task_module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str, float]] = []
    app = _stand_ins(task_module, monkeypatch, events)

    def broken(context: Context, client_app: object) -> None:
        raise FileNotFoundError("/data/a.csv")

    flower_runtime.prepare_app_while_message_arrives(broken)
    task_module.pull_task_input(_Client())
    assert task_module.install_from_fab(b"zip-bytes", skip_prompt=True) == Path("/apps/fedfusion")
    assert task_module.get_load_client_app_fn(default_app_ref="", app_path=None,
                                              multi_app=True)("fedfusion/fedfusion", "0.1.0", FAB_HASH) is app


def test_the_warm_up_loads_site_data_only_for_a_real_clientapp(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from flwr.clientapp import ClientApp

    from fedfusion.client import warm_executor
    from fedfusion.client.approval import refusing_app

    loaded: list[tuple[dict[str, Any], dict[str, Any]]] = []
    runtime = types.SimpleNamespace(site_from_context=lambda node, run: loaded.append((node, run)))
    monkeypatch.setitem(sys.modules, warm_executor.SITE_RUNTIME_MODULE, runtime)
    context = Context(run_id=7, node_id=3, node_config={"manifest": "/data/a.csv"}, state=RecordDict(),
                      run_config={"local-epochs": 2})
    warm_executor.load_site_data(context, refusing_app("this site has not approved app bundle sha256=ff..."))
    assert loaded == []  # a refused bundle: no data is read, not even to warm up
    warm_executor.load_site_data(context, ClientApp())
    assert loaded == [({"manifest": "/data/a.csv"}, {"local-epochs": 2})]
