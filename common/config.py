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
#: Kinds of modality. A modality's name is its kind, except image sequences: ``image:<sequence>``
#: (``image:t1``, ``image:flair``) when a schema lists several images per case (``Schema.images``).
MODALITY_KINDS = ("image", "clinical", "omics", "visits")
IMAGE_ENCODERS = ("separate", "shared")
TEMPORAL_ENCODERS = ("gru", "transformer")  # the "visits" modality: common/models/encoders/temporal.py
_SEQUENCE_SEP = ":"

Task = Literal["classification", "survival", "both"]
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "step", "warmup_cosine")


class ConfigError(ValueError):
    """A schema, model or training setting is invalid; the message names the setting and the file."""


def modality_kind(name: str) -> str:
    """The kind of a modality name: ``"image:t1"`` -> ``"image"``, ``"clinical"`` -> ``"clinical"``.

    Raises ``ValueError`` for a name that is no modality, so a typo is never silently a new group.
    """
    if not is_modality(name):
        raise ValueError(f"'{name}' is not a modality name; expected one of {MODALITY_KINDS} or "
                         f"'image{_SEQUENCE_SEP}<sequence>'")
    return name.split(_SEQUENCE_SEP, 1)[0]


def is_modality(name: str) -> bool:
    """Is ``name`` a modality (a kind, or ``image:<sequence>``)? Replaces ``name in MODALITIES``.

    Sequence names may not contain "." (they become parts of parameter names) nor another ":".
    """
    if name in MODALITY_KINDS:
        return True
    kind, sep, sequence = name.partition(_SEQUENCE_SEP)
    return kind == "image" and bool(sep) and _valid_sequence(sequence)


def image_modality(sequence: str) -> str:
    """Modality name of an image sequence: ``"t1"`` -> ``"image:t1"``."""
    return f"image{_SEQUENCE_SEP}{sequence}"


def _valid_sequence(sequence: str) -> bool:
    return bool(sequence) and "." not in sequence and _SEQUENCE_SEP not in sequence and sequence.strip() == sequence


@dataclass(frozen=True)
class ClinicalColumn:
    """One clinical column. ``categories`` lists allowed values of a categorical column, in order.

    ``may_be_absent``: the coordinator declares that a whole site may lack this column (a cohort that
    never recorded it), so ``site check`` warns instead of refusing an entirely empty column there.
    """

    name: str
    kind: Literal["numeric", "categorical"] = "numeric"
    categories: tuple[str, ...] = ()
    may_be_absent: bool = False

    @property
    def width(self) -> int:
        """Width of this column in the clinical vector: a value plus a missing indicator."""
        return 2 if self.kind == "numeric" else 1


@dataclass(frozen=True)
class ImageSpec:
    """Geometry every image is resized to; ``channels`` is 1 (grey) or 3 (RGB).

    ``depth`` > 0 makes the modality 3-D: each case is a volume (NIfTI, multi-frame DICOM, a folder
    of DICOM slices, a 3-D ``.npy``) resampled to ``(channels, depth, *size)`` and encoded by a
    volumetric backbone (``cnn3d_small``); 0 means 2-D images.
    """

    column: str = "image"
    size: tuple[int, int] = (64, 64)
    channels: int = 1
    depth: int = 0
    #: Sequence name when the spec is one of ``Schema.images`` (``"t1"`` -> modality ``image:t1``).
    name: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-case tensor shape: ``(C, H, W)``, or ``(C, D, H, W)`` for volumes."""
        return (self.channels, *((self.depth,) if self.depth else ()), *self.size)


@dataclass(frozen=True)
class VisitSpec:
    """Longitudinal input, the ``visits`` modality (common/longitudinal.py): the manifest is long format.

    Each manifest row is one visit; ``time_column`` holds its time (same unit and origin as the
    survival time), ``columns`` the per-visit numeric values. ``max_visits`` is how many of a case's
    most recent visits are kept: it fixes the (cases, max_visits, ...) tensor every site builds.
    """

    time_column: str = "visit_time"
    columns: tuple[str, ...] = ()
    max_visits: int = 8


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
    #: Several images per case (MRI sequences), each its own modality ``image:<name>``; exclusive with
    #: ``image``. Order = modality order.
    images: tuple[ImageSpec, ...] = ()
    site_column: str | None = None
    description: str = ""
    #: Longitudinal visits (long-format manifest), the ``visits`` modality; None = one row per case.
    visits: VisitSpec | None = None

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
        if self.image is not None and self.images:
            raise ConfigError(f"schema '{self.name}': give either 'image' (one image per case) or 'images' "
                              "(several sequences per case), not both")
        seq_names = [spec.name for spec in self.images]
        for seq in seq_names:
            if not _valid_sequence(seq):
                raise ConfigError(f"schema '{self.name}': image sequence name {seq!r} must be non-empty without "
                                  "'.', ':' or surrounding spaces (e.g. \"t1\", \"flair\")")
        for what, values in (("image sequence names", seq_names),
                             ("image columns", [spec.column for spec in self.images])):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ConfigError(f"schema '{self.name}': {what} listed twice: {twice}")
        for modality, spec in self.image_specs.items():
            what = "image" if modality == "image" else f"image sequence '{spec.name}'"
            if spec.channels not in (1, 3):
                raise ConfigError(f"schema '{self.name}': {what} channels must be 1 or 3, got {spec.channels}")
            if spec.depth < 0:
                raise ConfigError(f"schema '{self.name}': {what} depth must be >= 0 (0 = 2-D), got {spec.depth}")
            if min(spec.size) < 1:
                raise ConfigError(f"schema '{self.name}': {what} size must be positive [height, width], "
                                  f"got {list(spec.size)}")
        for what, values in (("classes", self.classes), ("omics", self.omics)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ConfigError(f"schema '{self.name}': {what} listed twice: {twice}")
        overlap = sorted(set(names) & set(self.omics))
        if overlap:
            raise ConfigError(f"schema '{self.name}': columns {overlap} are both clinical and omics")
        if self.visits is not None:
            self._check_visits(self.visits, set(names) | set(self.omics))

    def _check_visits(self, spec: VisitSpec, case_level: set[str]) -> None:
        if not spec.columns:
            raise ConfigError(f"schema '{self.name}': visits.columns must list at least one per-visit column")
        if spec.max_visits < 1:
            raise ConfigError(f"schema '{self.name}': visits.max_visits must be >= 1, got {spec.max_visits}")
        listed = [spec.time_column, *spec.columns]
        twice = sorted({c for c in listed if listed.count(c) > 1})
        if twice:
            raise ConfigError(f"schema '{self.name}': visits columns listed twice (or equal to the time column): "
                              f"{twice}")
        reserved = {"case_id", "site", "split", "omics", self.label_column, self.time_column, self.event_column}
        reserved |= {spec_.column for spec_ in self.image_specs.values()}
        clash = sorted(set(listed) & (case_level | reserved))
        if clash:
            raise ConfigError(f"schema '{self.name}': columns {clash} are both clinical and per-visit (or reserved); "
                              "a per-visit column must be its own manifest column")

    @property
    def image_specs(self) -> dict[str, ImageSpec]:
        """Image modality name -> its spec, in modality order: ``{"image": ...}`` or ``{"image:t1": ...}``."""
        if self.image is not None:
            return {"image": self.image}
        return {image_modality(spec.name): spec for spec in self.images}

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present in this federation: image modalities in schema order, then clinical, omics."""
        present = {"clinical": bool(self.clinical), "omics": bool(self.omics), "visits": self.visits is not None}
        return (*self.image_specs, *(m for m in ("clinical", "omics", "visits") if present[m]))

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
            images=tuple(s for s in self.images if image_modality(s.name) in keep),
            visits=self.visits if "visits" in keep else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clinical"] = [
            {"name": c.name, "kind": c.kind, **({"categories": list(c.categories)} if c.categories else {}),
             **({"may_be_absent": True} if c.may_be_absent else {})}
            for c in self.clinical
        ]
        out["classes"] = list(self.classes)
        out["omics"] = list(self.omics)
        if self.image is not None:
            out["image"] = _image_to_dict(self.image)
        if self.images:
            out["images"] = [{"name": spec.name, **_image_to_dict(spec)} for spec in self.images]
        else:
            out.pop("images", None)
        if self.visits is None:
            out.pop("visits", None)  # schemas without visits keep their exact JSON
        else:
            out["visits"] = {"time_column": self.visits.time_column, "columns": list(self.visits.columns),
                             "max_visits": self.visits.max_visits}
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
        for key in ("classes", "clinical", "omics"):
            if key in raw and not isinstance(raw[key], list | tuple):
                raise ConfigError(f"{source}: '{key}' must be a JSON list, got {raw[key]!r}")
        if raw.get("image") is not None and not isinstance(raw["image"], dict):
            raise ConfigError(f"{source}: 'image' must be a JSON object such as {{\"size\": [64, 64]}}, "
                              f"got {raw['image']!r}")
        images_raw = raw.get("images") or []
        if not isinstance(images_raw, list) or not all(isinstance(i, dict) for i in images_raw):
            raise ConfigError(f"{source}: 'images' must be a JSON list of objects such as "
                              f"[{{\"name\": \"t1\", \"column\": \"image_t1\"}}], got {raw['images']!r}")
        for i, entry in enumerate(images_raw):
            if "name" not in entry:
                raise ConfigError(f"{source}: images[{i}] needs a 'name' (the sequence, e.g. \"t1\")")
        try:
            clinical = tuple(
                ClinicalColumn(
                    name=str(c["name"]),
                    kind=c.get("kind", "numeric"),
                    categories=tuple(str(v) for v in c.get("categories", ())),
                    may_be_absent=_flag(c.get("may_be_absent", False), f"clinical column {c.get('name')!r}"),
                )
                for c in raw.get("clinical", ())
            )
            image_raw = raw.get("image")
            image = None if image_raw is None else _image_from_dict(image_raw, "image", "image")
            images = tuple(
                _image_from_dict(entry, f"images[{i}]", f"image_{entry['name']}", name=str(entry["name"]))
                for i, entry in enumerate(images_raw)
            )
            visits = _visits_from_dict(raw.get("visits"))
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
                images=images,
                site_column=raw.get("site_column"),
                description=str(raw.get("description", "")),
                visits=visits,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{source}: malformed schema ({type(err).__name__}: {err})") from None


def _image_to_dict(spec: ImageSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"column": spec.column, "size": list(spec.size), "channels": spec.channels}
    if spec.depth:
        out["depth"] = spec.depth
    return out


def _flag(value: Any, where: str) -> bool:
    """A schema's true/false key: JSON booleans only ("false" as a string would read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: 'may_be_absent' must be true or false, got {value!r}")
    return value


def _image_from_dict(raw: dict[str, Any], where: str, default_column: str, name: str = "") -> ImageSpec:
    """One image spec from JSON; ``where`` names it in errors (``image``, ``images[1]``)."""
    size = tuple(int(s) for s in raw.get("size", (64, 64)))
    if len(size) != 2:
        raise ConfigError(f"{where}.size must be [height, width], got {list(size)}")
    return ImageSpec(
        column=str(raw.get("column", default_column)),
        size=(size[0], size[1]),
        channels=int(raw.get("channels", 1)),
        depth=int(raw.get("depth", 0)),
        name=name,
    )


def _visits_from_dict(raw: Any) -> VisitSpec | None:
    """The schema's ``"visits"`` object, e.g. ``{"time_column": "visit_time", "columns": ["ef"], "max_visits": 8}``."""
    if raw is None:
        return None
    example = '{"time_column": "visit_time", "columns": ["grad", "ef"], "max_visits": 8}'
    if not isinstance(raw, dict):
        raise ConfigError(f"'visits' must be a JSON object such as {example}, got {raw!r}")
    unknown = sorted(set(raw) - {f.name for f in fields(VisitSpec)})
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in 'visits'; expected some of time_column, columns, max_visits")
    if not isinstance(raw.get("columns", []), list):
        raise ConfigError(f"'visits.columns' must be a JSON list, got {raw['columns']!r}")
    return VisitSpec(time_column=str(raw.get("time_column", "visit_time")),
                     columns=tuple(str(c) for c in raw.get("columns", ())),
                     max_visits=int(raw.get("max_visits", 8)))


def read_site_toml(path: str | Path) -> dict[str, Any]:
    """Parse a site.toml; a missing file, non-UTF-8 bytes or bad TOML is a :class:`ConfigError` naming it.

    The one reader for every command that opens a site config (``site start``, ``site audit``), so
    they fail the same way on the same bad file.
    """
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site config not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); "
                          "expected a TOML site config") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def load_schema(path: str | Path) -> Schema:
    """Read a schema JSON file; every problem is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"schema file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); "
                          "expected a schema JSON file") from None
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
    # Transfer learning (docs/transfer-learning.md). ``pretrained_min_fraction`` < 1 lets a file that
    # fits only partly load (unmatched keys are listed in a warning) as long as that fraction of the
    # backbone's tensors came from it; 1.0 = strict. ``trainable_blocks`` N > 0 trains only the last N
    # blocks/stages of the image backbone (and what follows them); ``freeze_backbone`` with N = 0
    # freezes the whole backbone (the projection, fusion and heads always train).
    pretrained_min_fraction: float = 1.0
    freeze_backbone: bool = False
    trainable_blocks: int = 0
    # Multi-sequence schemas (``Schema.images``): "separate" = one encoder per sequence (parameter
    # group ``image:<seq>``, averaged over the sites that have that sequence); "shared" = one encoder
    # for all sequences plus a learned sequence embedding (group ``image``). Ignored for one image.
    image_encoders: str = "separate"
    # Longitudinal visits (schema "visits"): "gru" or "transformer"; layers/heads are the transformer's.
    temporal_encoder: str = "gru"
    temporal_layers: int = 1
    temporal_heads: int = 2

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.hidden_dim < 1:
            raise ConfigError("model: embed-dim and hidden-dim must be positive")
        if self.image_encoders not in IMAGE_ENCODERS:
            raise ConfigError(f"model: image-encoders must be one of {IMAGE_ENCODERS}, got {self.image_encoders!r}")
        if self.temporal_encoder not in TEMPORAL_ENCODERS:
            raise ConfigError(f"model: temporal-encoder must be one of {TEMPORAL_ENCODERS}, "
                              f"got {self.temporal_encoder!r}")
        if self.temporal_layers < 1 or self.temporal_heads < 1:
            raise ConfigError("model: temporal-layers and temporal-heads must be >= 1")
        if not 0.0 < self.pretrained_min_fraction <= 1.0:
            raise ConfigError(f"model: pretrained-min-fraction must be in (0, 1], got {self.pretrained_min_fraction}")
        if self.trainable_blocks < 0:
            raise ConfigError(f"model: trainable-blocks must be >= 0, got {self.trainable_blocks}")
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
    # Optimiser and learning-rate schedule (common/training.py: make_optimizer, lr_factor). The
    # schedule runs over epochs in pooled/local training and over server rounds in a federation
    # (``lr_horizon`` = the run's rounds; 0 = the caller's own horizon, e.g. ``epochs`` in ``fit``).
    # ``lr_warmup`` and ``lr_step_size`` count the same unit (epochs or rounds).
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd (heavy-ball) and rmsprop only
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_step_size: int = 10
    lr_gamma: float = 0.1
    lr_min_factor: float = 0.0  # cosine floor, as a fraction of the base learning rate
    lr_horizon: int = 0
    backbone_lr_scale: float = 1.0  # image backbone's lr = lr * this (e.g. 0.1 for pretrained weights)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train: batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train: lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train: lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train: momentum must be in [0, 1), got {self.momentum}")
        if self.lr_warmup < 0 or self.lr_step_size < 1 or self.lr_horizon < 0:
            raise ConfigError("train: lr-warmup and lr-horizon must be >= 0 and lr-step-size >= 1")
        if not 0.0 < self.lr_gamma <= 1.0 or not 0.0 <= self.lr_min_factor <= 1.0:
            raise ConfigError(f"train: lr-gamma must be in (0, 1] and lr-min-factor in [0, 1], got "
                              f"{self.lr_gamma} and {self.lr_min_factor}")
        if self.backbone_lr_scale <= 0:
            raise ConfigError(f"train: backbone-lr-scale must be > 0 (freeze with freeze-backbone), "
                              f"got {self.backbone_lr_scale}")


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
