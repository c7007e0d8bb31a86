"""fedfusion: federated multimodal learning across hospital sites.

The design card's folders (`common/`, `client/`, `server/`, `simulations/`) are installed as
`fedfusion.common`, `fedfusion.client`, ... through setuptools' package-dir mapping.

Flower runs a ClientApp/ServerApp from the FAB, an unpacked copy of the source tree whose folders sit
*beside* this package, not inside it. Adding that parent folder to ``__path__`` makes
``fedfusion.client`` resolve to ``../client`` there, so the code that runs is the bundle the
coordinator sent (the one a site approves by hash), with a plain ``pip install .`` as much as with an
editable install. In site-packages the folders are inside this package and nothing is added.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_SOURCE_ROOT = _Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "common" / "config.py").is_file() and (_SOURCE_ROOT / "client" / "app.py").is_file():
    __path__.append(str(_SOURCE_ROOT))  # noqa: F821 - a package's own __path__
