"""A warm task process runs the ClientApp of the run's bundle, not the site's installed fedfusion.

The warm executor's parent imports ``fedfusion`` (itself) from the site's installed copy before it forks a
task process. Flower's loader then imports ``fedfusion.client.app`` with the bundle first on ``sys.path``,
but an already-imported ``fedfusion`` package resolves the submodule through its own ``__path__``: the task
ran the installed code, not the bundle the site approved by hash. Each case runs in a fresh interpreter
(the fix rewrites ``sys.modules``), through Flower's own install and load steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

TASK = r"""
import json, sys
from pathlib import Path
import fedfusion.client.flower_runtime as runtime   # what the warm parent has imported before fork()
bundle, digest, fixed = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
module = runtime.run_clientapp_module()
if fixed:
    runtime.import_apps_from_their_bundle()
module.install_from_fab(bundle.read_bytes(), skip_prompt=True)
load = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
app = load("hosp/fedfusion", "1.0.0", digest)
loaded = sys.modules["fedfusion.client.app"]
print(json.dumps({"file": loaded.__file__, "bundle": getattr(loaded, "FROM_BUNDLE", False),
                  "same_app": app is loaded.app}))
"""


def _bundle(tmp_path: Path) -> tuple[Path, str]:
    """A FAB laid out like fedfusion's (fedfusion/ beside client/ and common/) whose app marks itself."""
    from fedfusion.client.flower_runtime import build_fab

    root = tmp_path / "project"
    (root / "fedfusion").mkdir(parents=True)
    (root / "client").mkdir()
    (root / "common").mkdir()
    (root / "fedfusion" / "__init__.py").write_text((REPO / "fedfusion" / "__init__.py").read_text())
    (root / "client" / "__init__.py").write_text("")
    (root / "common" / "__init__.py").write_text("")
    (root / "common" / "config.py").write_text("")
    (root / "client" / "app.py").write_text("from flwr.clientapp import ClientApp\nFROM_BUNDLE = True\n"
                                            "app = ClientApp()\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "fedfusion"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "hosp"\n'
        '[tool.flwr.app.components]\nserverapp = "fedfusion.server.app:app"\n'
        'clientapp = "fedfusion.client.app:app"\n[tool.flwr.app.config]\nx = 1\n')
    content = build_fab(root)
    path = tmp_path / "bundle.fab"
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def _run(tmp_path: Path, fixed: bool) -> dict:
    bundle, digest = _bundle(tmp_path)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / f"flwr-home-{int(fixed)}")}
    done = subprocess.run([sys.executable, "-c", TASK, str(bundle), digest, "1" if fixed else "0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fixed", [False, True], ids=["flowers-loader-alone", "bundle-imports"])
def test_a_task_process_runs_the_bundles_clientapp(tmp_path: Path, fixed: bool) -> None:
    loaded = _run(tmp_path, fixed)
    if fixed:
        assert loaded["bundle"] is True and "flwr-home" in loaded["file"] and loaded["same_app"]
    else:  # what a warm task did before: the installed copy, whatever the bundle holds
        assert loaded["bundle"] is False and "flwr-home" not in loaded["file"]
