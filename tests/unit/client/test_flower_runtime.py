"""Canary for the Flower internals code approval hooks: fails if a Flower upgrade moves them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from fedfusion.client import flower_runtime


def test_run_clientapp_installs_then_loads_through_the_two_replaced_names() -> None:
    module = flower_runtime.run_clientapp_module()
    body = inspect.getsource(module.run_clientapp)
    install = body.index(f"{flower_runtime.INSTALL_NAME}(fab.content")
    factory = body.index(f"{flower_runtime.LOADER_FACTORY_NAME}(")
    load = re.search(r"load_client_app_fn\(\s*run\.fab_id,\s*run\.fab_version,\s*fab\.hash_str\s*\)", body)
    # Approval relies on: install before load, both looked up as module globals at call time, and no
    # other import of the bundle's code in between.
    assert load is not None and install < factory < load.start()
    assert "load_app(" not in body and "import_module(" not in body


def test_replacing_the_names_changes_what_run_clientapp_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    module = flower_runtime.run_clientapp_module()
    for name in (flower_runtime.INSTALL_NAME, flower_runtime.LOADER_FACTORY_NAME):
        monkeypatch.setattr(module, name, getattr(module, name))

    def install(content: bytes, **_: object) -> Path:
        return Path("x")

    def factory(**_: object) -> object:
        return lambda *a: None

    flower_runtime.replace_fab_install_and_load(install, factory)
    assert module.install_from_fab is install and module.get_load_client_app_fn is factory


def test_flower_still_names_app_folders_by_eight_hex_digits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The reason approval unpacks into its own full-hash folder; if Flower fixes this, revisit the docs."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    folder = flower_runtime.flower_app_folder("hosp/demo", "1.0.0", "ab" * 32)
    assert folder == tmp_path / "apps" / "hosp.demo.1.0.0.abababab"
    assert flower_runtime.flower_home() == tmp_path


def test_fab_metadata_is_flowers_reading_of_pyproject() -> None:
    assert flower_runtime.fab_metadata({"project": {"name": "demo", "version": "1.2.0"},
                                        "tool": {"flwr": {"app": {"publisher": "hosp"}}}}) == ("hosp/demo", "1.2.0")
