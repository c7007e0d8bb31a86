"""Example fedfusion plug-in (docs/plugins.md): ``models`` registers an image encoder and a fusion,
``data`` a data set. fedfusion imports those modules through entry points; nothing here runs on its own."""

__version__ = "0.1.0"
