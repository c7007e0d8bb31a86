"""fedfusion: federated multimodal learning across hospital sites.

The design card's folders (`common/`, `client/`, `server/`, `simulations/`) are installed as
`fedfusion.common`, `fedfusion.client`, ... through setuptools' package-dir mapping.
"""

__version__ = "0.1.0"
