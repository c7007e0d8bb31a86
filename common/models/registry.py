"""Name -> builder registries for image backbones, fusions and heads (the timm idiom).

A builder registers itself with a decorator when its module is imported; ``create_model`` looks
names up here and nowhere else, and the tests loop over :func:`list_fusions` and
:func:`list_image_backbones`, so a newly registered fusion or backbone is tested the moment it
exists. Registering the same name twice is an error (two modules silently fighting over a name
would make runs irreproducible).

Other distributions register here too, through the ``fedfusion.models`` entry point group
(:mod:`fedfusion.common.plugins`, docs/plugins.md): every list and look-up below first loads those
plug-ins (once per process), so ``create_model`` in the ServerApp, in each ClientApp process and in
simulation workers sees them with no start-up hook. Registering never loads plug-ins (a plug-in
registers while it is being loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedfusion.common import plugins

F = TypeVar("F", bound=Callable)

_FUSIONS: dict[str, Callable] = {}
_IMAGE_BACKBONES: dict[str, Callable] = {}
_VOLUMETRIC: set[str] = set()  # backbones that take (B, C, D, H, W) volumes
_HEADS: dict[str, Callable] = {}

#: Prefix of image backbone names that build any timm model by its timm name (``timm:regnetx_002``).
TIMM_PREFIX = "timm:"


_TRACKED: list[bool] = []  # non-empty once the tables are announced to the plug-in loader


def _with_plugins() -> None:
    """Load the ``fedfusion.models`` plug-ins once; called by every list and look-up.

    The tables are announced on the first call, not at import, so the built-in names (registered as
    ``fedfusion.common.models`` is imported) are the baseline a plug-in's additions are measured against.
    """
    if not _TRACKED:
        _TRACKED.append(True)
        plugins.track("fusion", lambda: _FUSIONS)
        plugins.track("image backbone", lambda: _IMAGE_BACKBONES)
        plugins.track("head", lambda: _HEADS)
    plugins.load_plugins(plugins.MODELS_GROUP)


def unknown_note() -> str:
    """Appended to an "unknown name" error: the ``fedfusion.models`` plug-ins that failed to load."""
    return plugins.failure_note(plugins.MODELS_GROUP)


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    if not name or not isinstance(name, str):
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")

    def decorator(builder: F) -> F:
        if name in table and table[name] is not builder:
            raise ValueError(f"{kind} '{name}' is already registered (by {table[name].__module__})")
        table[name] = builder
        return builder

    return decorator


def _lookup(table: dict[str, Callable], kind: str, name: str) -> Callable:
    _with_plugins()
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} '{name}'; registered: {sorted(table)}{unknown_note()}") from None


def register_fusion(name: str) -> Callable[[F], F]:
    """Register a :class:`~fedfusion.common.models.fusion.Fusion` subclass under ``name``.

    It is built as ``cls(modality_dims: dict[str, int], cfg: ModelConfig)``; ``create_model`` reads
    its class attributes (``raw_tabular``, ``uses_absent``, ``per_modality_heads``) first.
    """
    return _register(_FUSIONS, "fusion", name)


def register_image_backbone(name: str, *, volumetric: bool = False) -> Callable[[F], F]:
    """Register ``builder(image: ImageSpec, pretrained_path: str | None) -> nn.Module`` under ``name``.

    The backbone maps (B, C, H, W) float images to (B, num_features) (the width is found by one
    forward) and must already be Opacus-ready (no BatchNorm, no in-place ops on hooked outputs).
    A builder that accepts a keyword ``min_fraction`` is given ``ModelConfig.pretrained_min_fraction``
    when that is below 1 (partial loading of ``pretrained_path``); volumetric backbones set
    ``volumetric = True`` and take (B, C, D, H, W); registering them with ``volumetric=True`` lists them
    under ``list_image_backbones(volumetric=True)`` without building them (the test matrix splits on it).
    """
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone names may not start with '{TIMM_PREFIX}' (reserved for any timm model)")
    register = _register(_IMAGE_BACKBONES, "image backbone", name)

    def decorator(builder: F) -> F:
        registered = register(builder)
        if volumetric:
            _VOLUMETRIC.add(name)
        return registered

    return decorator


def register_head(name: str) -> Callable[[F], F]:
    """Register ``builder(in_dim: int, schema: Schema) -> nn.Module`` under ``name`` (a task)."""
    return _register(_HEADS, "head", name)


def list_fusions() -> list[str]:
    """Registered fusion names (built-in and plug-in), sorted."""
    _with_plugins()
    return sorted(_FUSIONS)


def list_image_backbones(volumetric: bool | None = None) -> list[str]:
    """Registered image backbone names, sorted; ``volumetric`` True/False keeps only 3-D / 2-D ones.

    Any timm model (2-D) is also reachable as ``timm:<name>``.
    """
    _with_plugins()
    return sorted(n for n in _IMAGE_BACKBONES if volumetric is None or (n in _VOLUMETRIC) == volumetric)


def list_heads() -> list[str]:
    """Registered head names (one per task), sorted."""
    _with_plugins()
    return sorted(_HEADS)


def get_fusion(name: str) -> Callable:
    return _lookup(_FUSIONS, "fusion", name)


def get_image_backbone(name: str) -> Callable:
    """The builder for ``name``; ``timm:<model>`` names are resolved by the image encoder module."""
    return _lookup(_IMAGE_BACKBONES, "image backbone", name)


def get_head(name: str) -> Callable:
    return _lookup(_HEADS, "head", name)
