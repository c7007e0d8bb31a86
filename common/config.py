"""Configuration every site and the coordinator must agree on, parsed once and frozen.

A federation is defined by one :class:`Schema` (the task, the label values, the clinical columns,
the omics features and the image geometry). Every site validates its manifest against the same
schema before it trains, so a mismatch is a clear error at ``fedfusion site check`` and never a
shape error in round 7. Schemas are JSON files (machine-written by dataset builders and shipped
by the coordinator); :func:`load_schema` reads them and :meth:`Schema.to_dict` writes them.

Training and model settings are separate frozen dataclasses so they can come from Flower's
flat, hyphenated run config (``fusion = "attention"``, ``local-epochs = 2``) or from the CLI.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

TASKS = ("classification", "survival", "both")
MODALITIES = ("image", "clinical", "omics")

Task = Literal["classification", "survival", "both"]


class ConfigError(ValueError):
    """A schema, model or training setting is invalid; the message names the setting and the file."""


@dataclass(frozen=True)
class ClinicalColumn:
    """One clinical column. ``categories`` lists allowed values of a categorical column, in order."""

    name: str
    kind: Literal["numeric", "categorical"] = "numeric"
    categories: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Width of this column in the clinical vector: a value plus a missing indicator."""
        return 2 if self.kind == "numeric" else 1


@dataclass(frozen=True)
class ImageSpec:
    """Geometry every image is resized to; ``channels`` is 1 (grey) or 3 (RGB)."""

    column: str = "image"
    size: tuple[int, int] = (64, 64)
    channels: int = 1


@dataclass(frozen=True)
class Schema:
    """The federation-wide data contract (DESIGN.md §3).

    ``classes`` are the label values as they appear in the manifest (as strings); class index
    ``i`` in model outputs means ``classes[i]``. ``omics`` names feature columns of the manifest,
    or, when the manifest has an ``omics`` column, the entries of each per-case ``.npy``/``.csv``
    vector in that order.
    """

    name: str
    task: Task
    classes: tuple[str, ...] = ()
    label_column: str = "label"
    time_column: str = "time"
    event_column: str = "event"
    clinical: tuple[ClinicalColumn, ...] = ()
    omics: tuple[str, ...] = ()
    image: ImageSpec | None = None
    site_column: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"schema '{self.name}': task must be one of {TASKS}, got {self.task!r}")
        if self.task in ("classification", "both") and len(self.classes) < 2:
            raise ConfigError(
                f"schema '{self.name}': a {self.task} task needs at least 2 classes, got {list(self.classes)}"
            )
        if not self.modalities:
            raise ConfigError(f"schema '{self.name}': needs at least one of image, clinical or omics")
        names = [c.name for c in self.clinical]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"schema '{self.name}': clinical columns listed twice: {dupes}")
        for col in self.clinical:
            if col.kind not in ("numeric", "categorical"):
                raise ConfigError(
                    f"schema '{self.name}': clinical column '{col.name}' kind must be numeric or "
                    f"categorical, got {col.kind!r}"
                )
            if col.kind == "categorical" and not col.categories:
                raise ConfigError(
                    f"schema '{self.name}': categorical column '{col.name}' needs a list of categories"
                )
        if self.image is not None and self.image.channels not in (1, 3):
            raise ConfigError(f"schema '{self.name}': image channels must be 1 or 3, got {self.image.channels}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present in this federation, always in :data:`MODALITIES` order."""
        present = {"image": self.image is not None, "clinical": bool(self.clinical), "omics": bool(self.omics)}
        return tuple(m for m in MODALITIES if present[m])

    @property
    def has_classification(self) -> bool:
        return self.task in ("classification", "both")

    @property
    def has_survival(self) -> bool:
        return self.task in ("survival", "both")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def clinical_width(self) -> int:
        """Length of the numeric part of the clinical vector (values + missing indicators)."""
        return sum(c.width for c in self.clinical if c.kind == "numeric")

    @property
    def categorical_columns(self) -> tuple[ClinicalColumn, ...]:
        return tuple(c for c in self.clinical if c.kind == "categorical")

    @property
    def numeric_columns(self) -> tuple[ClinicalColumn, ...]:
        return tuple(c for c in self.clinical if c.kind == "numeric")

    def with_modalities(self, keep: tuple[str, ...] | list[str]) -> Schema:
        """The same task restricted to some modalities: unimodal baselines and ablations."""
        unknown = sorted(set(keep) - set(self.modalities))
        if unknown:
            raise ConfigError(f"schema '{self.name}' has no modality {unknown}; it has {list(self.modalities)}")
        return replace(
            self,
            clinical=self.clinical if "clinical" in keep else (),
            omics=self.omics if "omics" in keep else (),
            image=self.image if "image" in keep else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clinical"] = [
            {"name": c.name, "kind": c.kind, **({"categories": list(c.categories)} if c.categories else {})}
            for c in self.clinical
        ]
        out["classes"] = list(self.classes)
        out["omics"] = list(self.omics)
        if self.image is not None:
            out["image"] = {"column": self.image.column, "size": list(self.image.size), "channels": self.image.channels}
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<schema>") -> Schema:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown schema keys {unknown}; expected some of {sorted(known)}")
        if "name" not in raw or "task" not in raw:
            raise ConfigError(f"{source}: a schema needs 'name' and 'task'")
        try:
            clinical = tuple(
                ClinicalColumn(
                    name=str(c["name"]),
                    kind=c.get("kind", "numeric"),
                    categories=tuple(str(v) for v in c.get("categories", ())),
                )
                for c in raw.get("clinical", ())
            )
            image_raw = raw.get("image")
            image = None
            if image_raw is not None:
                size = tuple(int(s) for s in image_raw.get("size", (64, 64)))
                if len(size) != 2:
                    raise ConfigError(f"{source}: image.size must be [height, width], got {list(size)}")
                image = ImageSpec(
                    column=str(image_raw.get("column", "image")),
                    size=(size[0], size[1]),
                    channels=int(image_raw.get("channels", 1)),
                )
            return cls(
                name=str(raw["name"]),
                task=raw["task"],
                classes=tuple(str(v) for v in raw.get("classes", ())),
                label_column=str(raw.get("label_column", "label")),
                time_column=str(raw.get("time_column", "time")),
                event_column=str(raw.get("event_column", "event")),
                clinical=clinical,
                omics=tuple(str(v) for v in raw.get("omics", ())),
                image=image,
                site_column=raw.get("site_column"),
                description=str(raw.get("description", "")),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{source}: malformed schema ({type(err).__name__}: {err})") from None


def load_schema(path: str | Path) -> Schema:
    """Read a schema JSON file; every problem is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"schema file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a schema must be a JSON object")
    return Schema.from_dict(raw, source=str(path))


@dataclass(frozen=True)
class ModelConfig:
    """How :func:`fedfusion.common.models.create_model` builds the network.

    ``image_backbone`` is a name from ``list_image_backbones()``; ``pretrained_path`` is a local
    file (never a hub download). ``modality_dropout`` is the probability, per sample and per
    present modality, of hiding it during training (at least one modality is always kept).
    """

    fusion: str = "attention"
    embed_dim: int = 64
    hidden_dim: int = 128
    dropout: float = 0.1
    modality_dropout: float = 0.1
    image_backbone: str = "cnn_small"
    pretrained_path: str | None = None
    categorical_embed_dim: int = 8

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.hidden_dim < 1:
            raise ConfigError("model: embed-dim and hidden-dim must be positive")
        for name in ("dropout", "modality_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model: {name.replace('_', '-')} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings; the same object drives pooled, local-only and federated training."""

    epochs: int = 20
    batch_size: int = 64  # the Cox loss is computed within a batch: small batches hold few events
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    patience: int = 5
    device: str = "auto"
    class_weighted: bool = True
    augment: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train: batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train: lr must be > 0, got {self.lr}")


def from_flat(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    """Build a config dataclass from Flower's flat hyphenated config (``local-epochs`` -> ``epochs``
    with ``prefix="local-"``); unknown keys are ignored so one run config can feed several objects."""
    names = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in flat.items():
        if prefix and not key.startswith(prefix):
            continue
        attr = key[len(prefix):].replace("-", "_")
        if attr in names:
            kwargs[attr] = value
    return cls(**kwargs)
