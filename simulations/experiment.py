"""``fedfusion experiment study.toml``: FLamby's protocol over seeds, from one TOML study file.

For every seed the runner builds the data set and its sites (``simulate.prepare_sites``: the seed
draws the train/val/test split, the simulated partition and every model's initial weights), then
trains and scores each method on every site's own test split:

- ``pooled``: one model on the union of the sites' training rows (what no hospital may do);
- ``local-only``: each site alone, scored on its own test split; every local model is also scored
  on every other site, which gives FLamby's *best local-only* (the one site whose model is best on
  average over all sites' test splits; the site is chosen on the mean over seeds, so it is the
  same site in every seed);
- federated methods in Flower's simulation runtime: ``fedavg``, ``fedprox``, ``fedadam``, the
  privacy/secure variants below, or any ``[method.NAME]`` (a name + run-config overrides);
- optional extras: ``leave-one-site-out`` (train on the other sites, score on the held-out site's
  test split: the same rows every other method is scored on there), ``unimodal`` baselines for
  multimodal data (each single modality -- and each all-but-one set for 3 modalities -- trained
  with the same method, scored on the test rows that have the modality: does fusion beat the best
  single modality?), ``ablation`` (the fused pooled/federated model scored with one modality hidden
  at test time, how much it leans on it), and ``tabular`` baselines
  (:func:`fedfusion.simulations.tabular_baselines.run_site_tabular_baselines`).

Study file (TOML; keys are hyphenated like Flower's run config; only ``dataset`` -- or
``sites-dir`` -- is required)::

    name = "ovarian-natural"          # report title and the privacy-ledger study key prefix
    dataset = "ovarian"               # `fedfusion datasets list`
    # sites-dir = "my-sites"          # or your own data instead of `dataset`: schema.json + one folder per
                                      # site with manifest.csv (relative to this file; docs/schema.md)
    seeds = [0, 1, 2, 3, 4]           # or a count: seeds = 5 (0..4)
    rounds = 10                       # federated rounds
    local-epochs = 2                  # epochs per round at each site
    fusion = "attention"              # concat | attention | gated | kronecker | late | early
    methods = ["pooled", "local-only", "fedavg", "fedprox", "fedadam"]
    leave-one-site-out = false
    unimodal = true                   # true | false | ["pooled", "fedavg"]; default: true for multimodal data
                                      # (true = pooled + the first federated method)
    ablation = true                   # test-time drop-one-modality of the fused models (multimodal data)
    tabular = true                    # true | false | ["random_forest", "cox_ph", ...]
    fail-fast = false                 # false: a failing step is recorded in the report, the study goes on

    [partition]                       # simulations/partition.py; options hyphenated
    how = "natural"                   # natural | iid | dirichlet | quantity | covariate-shift | modality-missing
    num-sites = 3                     # simulated partitions only
    alpha = 0.5                       # ... and any other keyword option of partition_manifest

    [training]
    batch-size = 64
    lr = 1e-3
    baseline-epochs = 30              # pooled / local-only / unimodal baselines (early stopping on val)
    device = "cpu"                    # cpu | cuda | auto
    cpus-per-site = 1                 # Flower simulation resources per virtual site
    gpus-per-site = 0.0

    [run-config]                      # Flower run-config keys for every federated method
    proximal-mu = 0.1                 # (common/federation_config.py DEFAULTS lists them)

    [method.fedprox-strong]           # a custom method: listed in `methods`, run-config overrides
    strategy = "fedprox"
    proximal-mu = 1.0

Built-in federated methods are ``fedavg``, ``fedprox``, ``fedadam`` and, because the run config has
the keys, ``fedavg-dp`` (sample-level DP-SGD at every site, ``target-epsilon = 8``),
``fedavg-client-dp`` (Flower's client-level DP wrapper), ``fedavg-secagg`` (secure aggregation) and the
personalised ``fedavg-ft`` / ``fedprox-ft`` (each site fine-tunes a copy of the last round's global model, 0..5
epochs chosen on its validation split; scored as that copy), ``fedper`` (private heads kept at the sites;
scored with each site's own head) and ``ditto`` (each site's own model, λ = 0.1; scored as that model).
Personalised methods deliver the last round (``model-selection = "last"``). ``fedprox-tuned`` runs FedProx
once per μ of ``fedprox-mu-grid = [0.001, 0.01, 0.1]`` (a top-level study key) and keeps the μ whose
delivered model has the best validation score, weighted by the sites' validation sizes (never test);
the report's notes name the μ chosen in each seed, and its unimodal / leave-one-site-out runs use it.
``schema``, ``run-dir``, ``data-dir``, ``sites``, ``seed`` and ``resume`` belong to the runner. Each
federated run gets its own privacy-ledger ``study`` key (study name / start time / seed / method),
so seeds and methods never spend each other's ε budget.

Outputs in ``--out``: ``results.csv`` (one row per seed x method x site), ``summary.csv`` /
``summary.json`` (per method: mean +/- sd over seeds of the mean over sites, FLamby's convention),
``summary_by_site.csv``, ``rounds.csv``, ``report.md`` + ``report.html`` (self-contained), PNG
plots in ``plots/``, and ``runs/seed-N/`` with each seed's data (``data/``) and each federated run
folder (``model.pt`` there is what ``fedfusion explain`` reads). This module holds the study file
and the entry point; each seed runs in :mod:`fedfusion.simulations.study_runner` and the files are
written by :mod:`fedfusion.simulations.study_report`.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedfusion.common.federation_config import DEFAULTS
from fedfusion.common.personalization import PERSONALIZE_PRESETS
from fedfusion.common.progress import Step
from fedfusion.common.training import Predictions
from fedfusion.simulations.datasets import dataset_names
from fedfusion.simulations.partition import PARTITIONS, partition_manifest

BASELINES = ("pooled", "local-only")
#: Built-in federated methods: name -> run-config overrides (only keys the run config knows).
BUILTIN_METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "fedadam": {"strategy": "fedadam"},
}
if "dp-mode" in DEFAULTS and "target-epsilon" in DEFAULTS:
    BUILTIN_METHODS["fedavg-dp"] = {"strategy": "fedavg", "dp-mode": "sample", "target-epsilon": 8.0}
    BUILTIN_METHODS["fedavg-client-dp"] = {"strategy": "fedavg", "dp-mode": "client"}
if "secure-aggregation" in DEFAULTS:
    BUILTIN_METHODS["fedavg-secagg"] = {"strategy": "fedavg", "secure-aggregation": True}
if "private-parts" in DEFAULTS:  # personalisation (common/personalization.py)
    BUILTIN_METHODS["fedavg-ft"] = {"strategy": "fedavg", **PERSONALIZE_PRESETS["ft"]}
    BUILTIN_METHODS["fedprox-ft"] = {"strategy": "fedprox", **PERSONALIZE_PRESETS["ft"]}
    BUILTIN_METHODS["fedper"] = {"strategy": "fedavg", **PERSONALIZE_PRESETS["fedper"]}
if "ditto-lambda" in DEFAULTS:
    BUILTIN_METHODS["ditto"] = {"strategy": "fedavg", **PERSONALIZE_PRESETS["ditto"]}
#: Built-in methods that run once per value of one run-config key and keep the value whose delivered model
#: scores best on the sites' validation splits (simulations/tuning.py): name -> (key, study key, default grid).
TUNED_METHODS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "fedprox-tuned": ("proximal-mu", "fedprox-mu-grid", (0.001, 0.01, 0.1)),
}
BUILTIN_METHODS["fedprox-tuned"] = {"strategy": "fedprox"}
#: Run-config keys the runner sets for every run; a study may not override them.
RUNNER_KEYS = frozenset({"schema", "run-dir", "data-dir", "sites", "seed", "resume"})
_TOP_KEYS = {"name", "dataset", "sites-dir", "seeds", "rounds", "local-epochs", "fusion", "methods",
             "leave-one-site-out", "unimodal", "ablation", "tabular", "fail-fast", "partition", "training",
             "run-config", "method", *(study_key for _, study_key, _ in TUNED_METHODS.values())}
_TRAINING_KEYS = {"batch-size": int, "lr": float, "baseline-epochs": int, "device": str, "cpus-per-site": int,
                  "gpus-per-site": float}


class StudyError(ValueError):
    """The study file is wrong; the message names the file and the key to change."""


@dataclass(frozen=True)
class Method:
    """One arm of the study: a baseline (``pooled``/``local-only``) or a federated run config."""

    name: str
    kind: str  # "pooled" | "local-only" | "federated"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: A tuned method (``fedprox-tuned``): one federation per value of ``tune_key``; the best on validation is kept.
    tune_key: str = ""
    tune_values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Study:
    """A parsed study file (see the module docstring); :func:`load_study` is the way to build one."""

    dataset: str
    name: str = ""
    sites_dir: str | None = None  # your own sites (simulations/user_sites.py); `dataset` is then a label
    seeds: tuple[int, ...] = (0,)
    rounds: int = 5
    local_epochs: int = 2
    fusion: str = "attention"
    methods: tuple[Method, ...] = ()
    partition: str = "natural"
    num_sites: int = 3
    partition_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    lr: float = 1e-3
    baseline_epochs: int = 30
    device: str = "cpu"
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    run_config: Mapping[str, Any] = field(default_factory=dict)
    leave_one_site_out: bool = False
    unimodal: tuple[str, ...] | None = None  # None: automatic (multimodal data -> pooled + first federated)
    ablation: bool = True
    tabular: tuple[str, ...] | bool = True
    fail_fast: bool = False

    @property
    def federated(self) -> tuple[Method, ...]:
        return tuple(m for m in self.methods if m.kind == "federated")

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)


# ----------------------------------------------------------------------------------- parsing


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file; every problem is a :class:`StudyError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{path}: not valid TOML ({err})") from None
    return parse_study(raw, str(path))


def parse_study(raw: Mapping[str, Any], source: str = "<study>") -> Study:
    """Validate the TOML table of a study (``source`` names the file in error messages)."""

    def fail(key: str, why: str) -> StudyError:
        return StudyError(f"{source}: '{key}' {why}")

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"is not a study key; expected some of {sorted(_TOP_KEYS)}")
    sites_dir = _sites_dir(raw, source, fail)
    known = sorted(dataset_names())  # shipped and plug-in data sets
    if "dataset" not in raw and sites_dir is None:
        raise fail("dataset", f"is required (or 'sites-dir' for your own data); one of {known}")
    dataset = f"sites-dir {sites_dir}" if sites_dir is not None else _typed(raw, "dataset", str, fail)
    if sites_dir is None and dataset not in known:
        raise fail("dataset", f"= {dataset!r} is not a shipped data set; choose one of {known}")
    seeds = _seeds(raw.get("seeds", 1), fail)
    rounds = _positive(raw, "rounds", 5, fail)
    local_epochs = _positive(raw, "local-epochs", 2, fail)
    fusion = _typed(raw, "fusion", str, fail, "attention")
    from fedfusion.common.models import list_fusions

    if fusion not in list_fusions():
        raise fail("fusion", f"= {fusion!r} is not a registered fusion; choose one of {list_fusions()}")
    partition, num_sites, options = _partition(raw.get("partition", {}), fail)
    training = _section(raw, "training", fail)
    for key, value in training.items():
        if key not in _TRAINING_KEYS:
            raise fail(f"training.{key}", f"is not a training key; expected some of {sorted(_TRAINING_KEYS)}")
        kind = _TRAINING_KEYS[key]
        accepted = (int, float) if kind is float else (kind,)  # TOML writes 1 for 1.0
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise fail(f"training.{key}", f"must be a {kind.__name__}, got {value!r}")
    run_config = _run_config(_section(raw, "run-config", fail), "run-config", fail)
    methods = _methods(raw, fail)
    fed_names = [m.name for m in methods if m.kind == "federated"]
    unimodal = raw.get("unimodal")
    unimodal_methods: tuple[str, ...] | None
    if unimodal is None:
        unimodal_methods = None
    elif unimodal is True:
        unimodal_methods = tuple(n for n in ("pooled", *fed_names[:1]) if n in [m.name for m in methods])
    elif unimodal is False:
        unimodal_methods = ()
    elif isinstance(unimodal, list) and all(isinstance(n, str) for n in unimodal):
        missing = [n for n in unimodal if n not in [m.name for m in methods]]
        if missing:
            raise fail("unimodal", f"names {missing}, which are not in 'methods'")
        unimodal_methods = tuple(unimodal)
    else:
        raise fail("unimodal", f"must be true, false or a list of method names, got {unimodal!r}")
    tabular = raw.get("tabular", True)
    if isinstance(tabular, list):
        from fedfusion.simulations.tabular_baselines import CLASSIFIERS, SURVIVAL_MODELS

        bad = [n for n in tabular if n not in (*CLASSIFIERS, *SURVIVAL_MODELS)]
        if bad:
            raise fail("tabular", f"names unknown model(s) {bad}; choose from {[*CLASSIFIERS, *SURVIVAL_MODELS]}")
        tabular = tuple(tabular)
    elif not isinstance(tabular, bool):
        raise fail("tabular", f"must be true, false or a list of model names, got {tabular!r}")
    return Study(
        dataset=dataset,
        sites_dir=sites_dir,
        name=_typed(raw, "name", str, fail, f"{Path(sites_dir).name if sites_dir else dataset}-{partition}"),
        seeds=seeds,
        rounds=rounds,
        local_epochs=local_epochs,
        fusion=fusion,
        methods=methods,
        partition=partition,
        num_sites=num_sites,
        partition_options=options,
        batch_size=int(training.get("batch-size", 64)),
        lr=float(training.get("lr", 1e-3)),
        baseline_epochs=int(training.get("baseline-epochs", 30)),
        device=str(training.get("device", "cpu")),
        cpus_per_site=int(training.get("cpus-per-site", 1)),
        gpus_per_site=float(training.get("gpus-per-site", 0.0)),
        run_config=run_config,
        leave_one_site_out=_typed(raw, "leave-one-site-out", bool, fail, False),
        unimodal=unimodal_methods,
        ablation=_typed(raw, "ablation", bool, fail, True),
        tabular=tabular,
        fail_fast=_typed(raw, "fail-fast", bool, fail, False),
    )


def _sites_dir(raw: Mapping[str, Any], source: str, fail: Callable[[str, str], StudyError]) -> str | None:
    """``sites-dir`` resolved against the study file's folder (None when absent); never with ``dataset``."""
    if "sites-dir" not in raw:
        return None
    if "dataset" in raw:
        raise fail("sites-dir", "and 'dataset' are both given; keep one (sites-dir = your own data)")
    value = _typed(raw, "sites-dir", str, fail)
    path = Path(value)
    if not path.is_absolute() and source != "<study>":
        path = Path(source).resolve().parent / path
    if not path.is_dir():
        raise fail("sites-dir", f"= {value!r}: no such folder ({path}); expected schema.json + one sub-folder per site")
    return str(path)


def _typed(raw: Mapping[str, Any], key: str, kind: type, fail: Callable[[str, str], StudyError],
           default: Any = None) -> Any:
    value = raw.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise fail(key, f"must be a {kind.__name__}, got {value!r}")
    return value


def _positive(raw: Mapping[str, Any], key: str, default: int, fail: Callable[[str, str], StudyError]) -> int:
    value = _typed(raw, key, int, fail, default)
    if value < 1:
        raise fail(key, f"must be >= 1, got {value}")
    return int(value)


def _seeds(value: Any, fail: Callable[[str, str], StudyError]) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise fail("seeds", f"lists a seed twice: {value}")
        return tuple(value)
    raise fail("seeds", f"must be a positive count or a non-empty list of distinct integers, got {value!r}")


def _section(raw: Mapping[str, Any], key: str, fail: Callable[[str, str], StudyError]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise fail(key, f"must be a table ([{key}]), got {value!r}")
    return dict(value)


def _partition(value: Any, fail: Callable[[str, str], StudyError]) -> tuple[str, int, dict[str, Any]]:
    if not isinstance(value, dict):
        raise fail("partition", f"must be a table ([partition]), got {value!r}")
    table = dict(value)
    how = table.pop("how", "natural")
    if how not in PARTITIONS:
        raise fail("partition.how", f"= {how!r} is not a partition; choose one of {list(PARTITIONS)}")
    num_sites = table.pop("num-sites", 3)
    if not isinstance(num_sites, int) or isinstance(num_sites, bool) or num_sites < 1:
        raise fail("partition.num-sites", f"must be a positive integer, got {num_sites!r}")
    allowed = {name.replace("_", "-"): name for name, p in inspect.signature(partition_manifest).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY}
    options: dict[str, Any] = {}
    for key, option in table.items():
        if key not in allowed:
            raise fail(f"partition.{key}", f"is not a partition option; expected some of "
                                           f"{['how', 'num-sites', *sorted(allowed)]}")
        options[allowed[key]] = option
    return how, num_sites, options


def _run_config(table: Mapping[str, Any], where: str, fail: Callable[[str, str], StudyError]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in RUNNER_KEYS:
            raise fail(f"{where}.{key}", "is set by the experiment runner for every run; remove it")
        if key not in DEFAULTS:
            raise fail(f"{where}.{key}", "is not a run-config key (common/federation_config.py DEFAULTS); "
                                         f"known: {sorted(set(DEFAULTS) - RUNNER_KEYS)}")
        if isinstance(value, dict | list):
            raise fail(f"{where}.{key}", f"must be a single value (run config is flat), got {value!r}")
        out[key] = value
    if "strategy" in out:
        from fedfusion.server.strategy import STRATEGIES

        if out["strategy"] not in STRATEGIES:
            raise fail(f"{where}.strategy",
                       f"= {out['strategy']!r} is not a strategy; choose one of {sorted(STRATEGIES)}")
    return out


def _methods(raw: Mapping[str, Any], fail: Callable[[str, str], StudyError]) -> tuple[Method, ...]:
    names = raw.get("methods", ["pooled", "local-only", "fedavg"])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise fail("methods", f"must be a non-empty list of method names, got {names!r}")
    if len(set(names)) != len(names):
        raise fail("methods", f"lists a method twice: {names}")
    custom = _section(raw, "method", fail)
    for name in custom:
        if name not in names:
            raise fail(f"method.{name}", "is defined but not listed in 'methods'; add it there (the list sets what "
                                         "runs, in that order)")
        if name in BASELINES:
            raise fail(f"method.{name}", "is a baseline name; give the federated variant another name")
    out: list[Method] = []
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise fail("methods", f"name {name!r} must be letters, digits and . _ + - (it names a folder)")
        if name in BASELINES:
            out.append(Method(name, name))
        elif name in custom:
            table = custom[name]
            if not isinstance(table, dict):
                raise fail(f"method.{name}", f"must be a table of run-config overrides, got {table!r}")
            overrides = {"strategy": "fedavg", **_run_config(table, f"method.{name}", fail)}
            out.append(Method(name, "federated", overrides))
        elif name in TUNED_METHODS:
            key, study_key, grid = TUNED_METHODS[name]
            out.append(Method(name, "federated", dict(BUILTIN_METHODS[name]), tune_key=key,
                              tune_values=_grid(raw.get(study_key, list(grid)), study_key, fail)))
        elif name in BUILTIN_METHODS:
            out.append(Method(name, "federated", dict(BUILTIN_METHODS[name])))
        else:
            raise fail("methods", f"names {name!r}, which is neither built in ({[*BASELINES, *BUILTIN_METHODS]}) "
                                  f"nor defined in a [method.{name}] table")
    for name, (_, study_key, _) in TUNED_METHODS.items():
        if study_key in raw and name not in names:
            raise fail(study_key, f"is set but '{name}' is not in 'methods'; add it there or remove the key")
    return tuple(out)


def _grid(value: Any, key: str, fail: Callable[[str, str], StudyError]) -> tuple[float, ...]:
    """A tuned method's grid: a non-empty list of distinct positive numbers (TOML may write 1 for 1.0)."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf for v in value)):
        raise fail(key, f"must be a non-empty list of positive numbers, got {value!r}")
    if len(set(value)) != len(value):
        raise fail(key, f"lists a value twice: {value}")
    return tuple(float(v) for v in value)


# ----------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class StudyProgress:
    """What the runner is doing, for a progress display (``on_progress``)."""

    seed: int
    seed_index: int  # 1-based
    seeds: int
    step: str
    done: int  # steps finished in this seed
    steps: int  # steps in this seed
    round: int | None = None
    rounds: int | None = None
    metric: str = ""
    value: float = math.nan


@dataclass
class StudyRecord:
    """Everything a study produced, in memory; :mod:`study_report` turns it into files."""

    study: Study
    out_dir: Path
    dataset_name: str = ""
    metric: str = ""
    task: str = ""
    modalities: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    rows: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, list[tuple[int, str, Predictions]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    #: Federations that stopped before their last round ({"seed", "method", "why"}): their rows are a
    #: model of fewer rounds than the study asked for, so ``fedfusion experiment`` exits 1 (like ``simulate``).
    ended_early: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def run_study(study: Study, out_dir: str | Path,
              on_progress: Callable[[StudyProgress], None] | None = None) -> StudyRecord:
    """Run every seed and method of ``study`` into ``out_dir`` and write the report files."""
    from fedfusion.simulations.study_report import write_study_outputs
    from fedfusion.simulations.study_runner import SeedRun

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(asdict(study), indent=2, default=str) + "\n")
    record = StudyRecord(study=study, out_dir=out)
    began = time.monotonic()
    token = time.strftime("%Y%m%dT%H%M%S")
    for index, seed in enumerate(study.seeds, start=1):
        SeedRun(study, seed, index, out / "runs" / f"seed-{seed}", record, on_progress, token).run()
    record.seconds = time.monotonic() - began
    write_study_outputs(record)
    return record


def ended_early_lines(record: StudyRecord) -> list[str]:
    """One line per method whose federation ended early in some seed: the method, the seeds, the reason
    (the first seed's; every site refusing a round is usually the same reason in every seed)."""
    by_method: dict[str, list[dict[str, str]]] = {}
    for entry in record.ended_early:
        by_method.setdefault(entry["method"], []).append(entry)
    lines = []
    for method, entries in by_method.items():
        seeds = ", ".join(e["seed"] for e in entries)
        lines.append(f"{method} ended early (seed{'s' if len(entries) > 1 else ''} {seeds}): {entries[0]['why']}")
    return lines


def study_step(event: StudyProgress) -> Step:
    """A runner event as a progress :class:`~fedfusion.common.progress.Step` (``fedfusion experiment``
    shows it as a bar on a terminal, as one plain line per event in a log)."""
    detail = f"{event.metric} {event.value:.3f} " if event.metric and not math.isnan(event.value) else ""
    return Step(f"seed {event.seed} ({event.seed_index}/{event.seeds}): {event.step}", event.round, event.rounds,
                "round" if event.round is not None else "", f"{detail}(steps done {event.done}/{event.steps})")
