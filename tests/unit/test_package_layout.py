"""The FAB layout: Flower unpacks the source tree and imports `fedfusion.client.app` from it.

The card's folders sit beside the `fedfusion` package there, so without fedfusion/__init__.py's
`__path__` extension a plain (non-editable) install would fail to import the ClientApp, and an
editable one would silently run the site's working tree instead of the bundle the coordinator sent.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_fab_copy_imports_its_own_modules(tmp_path: Path) -> None:
    fab = tmp_path / "fab"
    for folder in ("fedfusion", "common", "client", "server", "simulations"):
        shutil.copytree(REPO / folder, fab / folder, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "import fedfusion.client.app as c, fedfusion.server.app as s; print(c.__file__); print(s.__file__)")
    done = subprocess.run([sys.executable, "-c", probe, str(fab)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    client_file, server_file = done.stdout.split()
    assert Path(client_file) == fab / "client" / "app.py"
    assert Path(server_file) == fab / "server" / "app.py"


def test_fab_include_covers_every_package_folder() -> None:
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["flwr"]["app"]["fab-include"]
    for target in config["tool"]["setuptools"]["package-dir"].values():
        assert f"{target}/**/*.py" in include, f"{target}/ is a package folder but not in the FAB"
