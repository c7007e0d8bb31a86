"""The site's side of personalisation: its private parameter groups, kept on disk, and local fine-tuning.

Private parts (``private-parts``, FedPer-style; :mod:`fedfusion.common.personalization`): after every
train round the site writes the private groups' tensors to a file in its state folder (the folder of its
privacy ledger: beside the manifest in deployment, ``data-dir`` in a simulation) and loads them over the
delivered global model before the next round trains and before every evaluation. Why a file and not only
Flower's ``context.state``: ``context.state`` belongs to one Flower run, and a resumed run
(``fedfusion run --resume``, a re-started simulation) is a new run whose sites would otherwise start
from the server's never-trained private groups; the file makes a resumed run continue exactly.

The file is keyed by site, study and the run config's resume-neutral hash, and holds the private part
*per round* (the newest :data:`KEEP_ROUNDS`): round ``r`` trains from the newest entry before ``r`` and
evaluates with the newest up to ``r``. A coordinator that crashed after this site trained round ``r`` but
before checkpointing it asks for round ``r`` again; the entry of the lost attempt is then ignored and
overwritten, so the retried round starts exactly where the first attempt did.

Fine-tuning (``personal-finetune-epochs``, FedAvg+FT): :func:`fine_tune` trains a *copy* of the model
the site evaluates; nothing of it is kept or sent, only its test metrics (``personal_*``) leave, under
the same release rule as every evaluation metric (:mod:`fedfusion.client.eval_release`). With sample-level
DP those metrics are, like all evaluation metrics, outside the training ε (the fine-tuning itself is not
DP-SGD: its model never leaves the site).

Ditto (``ditto-lambda``): each site keeps a whole personal model v_k in a second store file beside the
private parts' one (same keying, same per-round entries, so a resume and a retried round continue exactly).
After the round's normal training (untouched: the update sent is bit-for-bit what it is without Ditto),
:func:`train_personal` trains v_k from its previous round's value with λ/2·||v_k − w||² toward the global
model w the round delivered. v_k is never sent; its test metrics leave as ``personal_*`` at every
evaluation, under the evaluation release rule. With ``dp-mode = "sample"`` v_k is trained without DP-SGD and
charges nothing: it is never released and the released update does not depend on it, so the ledger's ε
still covers everything that leaves except evaluation metrics (which it never covers).

Per-case test predictions (:func:`keep_predictions`): at the run's last round, a site that evaluates a model of
its own (private parts, FedAvg+FT's fine-tuned copy, Ditto's model) also writes that model's test predictions to
``personal-state/<site>-<hash>-predictions-round<N>.npz`` beside its personal state. Why: a study needs per-case
predictions for bootstrap intervals, ROC/KM curves and paired statistics, and only the site holds the model that
made them; the server's ``model.pt`` is not it. The file is the site's own (what it could compute from its own
model and data at any time); it is no part of any reply. A simulated study, which plays every site, reads it
(:func:`simulated_predictions_path`, ``simulations/study_runner.py``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfusion.client.runtime import SiteRuntime, round_schedule, site_policy, study_name
from fedfusion.common.config import Schema, TrainConfig
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.personalization import PERSONAL_EPOCHS_KEY, PERSONAL_PREFIX, private_part, shared_part
from fedfusion.common.records import NUM_EXAMPLES, VAL_COUNT_KEY, VAL_PREFIX
from fedfusion.common.training import (
    LossFunction,
    Predictions,
    class_weights_for,
    make_loader,
    make_optimizer,
    metrics_from,
    predict,
    primary_metric,
    seed_everything,
    train_epochs,
)

log = logging.getLogger("fedfusion.client.personalization")

#: Rounds of private parts kept per file: a resume repeats at most the round after the last checkpoint.
KEEP_ROUNDS = 3
_ROUND_KEY = re.compile(r"^r(\d{6})/(.+)$")


class PrivatePartStore:
    """The private groups of one site in one study/run configuration, per round, in one ``.npz`` file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def in_folder(cls, folder: str | Path, site_id: str, study: str, config_hash: str,
                  kind: str = "private") -> PrivatePartStore:
        """The store of ``site_id`` for a study and run configuration, in the site's state folder.

        ``kind``: ``"private"`` (private parts) or ``"ditto"`` (the whole personal model), one file each.
        """
        tag = "" if kind == "private" else f"\0{kind}"
        digest = hashlib.sha256(f"{site_id}\0{study}\0{config_hash}{tag}".encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site_id)[:40]
        name = f"{safe}-{digest}.npz" if kind == "private" else f"{safe}-{kind}-{digest}.npz"
        return cls(Path(folder) / "personal-state" / name)

    def _read(self) -> dict[int, dict[str, np.ndarray]]:
        if not self.path.is_file():
            return {}
        out: dict[int, dict[str, np.ndarray]] = {}
        with np.load(self.path, allow_pickle=False) as data:
            for key in data.files:
                match = _ROUND_KEY.match(key)
                if match is None:
                    raise ValueError(f"{self.path}: unexpected entry {key!r}; delete the file to start the private "
                                     "parts afresh")
                out.setdefault(int(match.group(1)), {})[match.group(2)] = data[key]
        return out

    def rounds(self) -> list[int]:
        return sorted(self._read())

    def latest(self, *, before: int | None = None, upto: int | None = None) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest stored round ``< before`` (or ``<= upto``) and its tensors; None when there is none."""
        limit = (before - 1) if before is not None else upto
        found = {r: v for r, v in self._read().items() if limit is None or r <= limit}
        if not found:
            return None
        newest = max(found)
        return newest, found[newest]

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Store round ``server_round``'s private tensors (replacing an earlier attempt of it), atomically."""
        stored = {r: v for r, v in self._read().items() if r != server_round}
        stored[server_round] = {k: np.asarray(v) for k, v in arrays.items()}
        kept = sorted(stored)[-KEEP_ROUNDS:]
        flat = {f"r{r:06d}/{name}": value for r in kept for name, value in stored[r].items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as handle:
            np.savez(handle, **flat)  # type: ignore[arg-type]  # numpy stubs read **kwds as allow_pickle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)


def load_private(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Put the site's stored private tensors into ``model`` (in place); every key must exist with its shape."""
    state = model.state_dict()
    wrong = sorted(k for k, v in arrays.items() if k not in state or tuple(state[k].shape) != tuple(v.shape))
    if wrong:
        raise ValueError(f"the stored private parts do not fit the run's model ({wrong[:5]}); the run's model "
                         "changed under the same settings: delete the site's personal-state file")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=False)


def keep_private(model: torch.nn.Module, parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The model's private tensors, as numpy copies (what the store keeps)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in private_part(model.state_dict(), parts).items()}


#: Arrays of :class:`~fedfusion.common.training.Predictions` a prediction file may hold (absent: the task has none).
_PREDICTION_FIELDS = ("probs", "labels", "risk", "time", "event")


@dataclass(frozen=True)
class SitePredictions:
    """A site's per-case test predictions of its own model, as kept in its prediction file.

    ``case_ids`` are the test rows' ``case_id`` in split order (the order the study runner scores a manifest
    in), so a reader can check the rows line up before pairing them with other methods' predictions.
    """

    pred: Predictions
    case_ids: tuple[str, ...]
    site_id: str
    server_round: int
    model: str  # "private-parts", "finetune" or "ditto": which personal model made them


def predictions_path(folder: str | Path, site_id: str, study: str, config_hash: str, server_round: int) -> Path:
    """Where a site keeps round ``server_round``'s per-case test predictions: beside its private-parts file,
    under the same site/study/configuration key (``personal-state/<site>-<hash>-predictions-round<N>.npz``)."""
    state = PrivatePartStore.in_folder(folder, site_id, study, config_hash).path
    return state.with_name(f"{state.stem}-predictions-round{int(server_round)}.npz")


def simulated_predictions_path(run_config: Mapping[str, Any], site_id: str, schema: Schema, server_round: int) -> Path:
    """The prediction file a *simulated* site of this run config writes (no node config: the state folder is the
    simulation's, ``data-dir`` or ``sim-privacy-policy``'s ledger folder), for a study runner that plays every
    site. ``run_config`` must be the one the ClientApp ran with (its hash names the file)."""
    cfg = FederationConfig.from_run_config(dict(run_config))
    folder = Path(site_policy({}, run_config, site_id).ledger).parent
    return predictions_path(folder, site_id, study_name(cfg, schema), cfg.config_hash(), server_round)


def write_predictions(path: Path, found: SitePredictions) -> None:
    """Write ``found`` to ``path`` atomically (a retried round overwrites its earlier attempt)."""
    arrays: dict[str, np.ndarray] = {name: np.asarray(value) for name in _PREDICTION_FIELDS
                                     if (value := getattr(found.pred, name)) is not None}
    arrays.update(case_id=np.array(found.case_ids, dtype=str), loss=np.array(float(found.pred.loss)),
                  site=np.array(found.site_id), round=np.array(int(found.server_round)), model=np.array(found.model))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stubs read **kwds as allow_pickle
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_predictions(path: Path) -> SitePredictions:
    """A prediction file written by :func:`write_predictions`; ValueError when it is not one."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("case_id", "loss", "site", "round", "model") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: not a per-case prediction file (missing {missing})")
        pred = Predictions(**{k: data[k] for k in _PREDICTION_FIELDS if k in data.files}, loss=float(data["loss"]))
        return SitePredictions(pred=pred, case_ids=tuple(str(c) for c in data["case_id"]), site_id=str(data["site"]),
                               server_round=int(data["round"]), model=str(data["model"]))


def site_test_case_ids(site: SiteRuntime) -> Sequence[str]:
    """The site's test rows' case ids, in the order its test loader yields them."""
    rows = site.test_set.rows
    return [str(c) for c in site.manifest.frame["case_id"].to_numpy()[np.asarray(rows, dtype=int)]]


def _val_score(model: torch.nn.Module, site: SiteRuntime, loss_fn: LossFunction) -> tuple[float, float]:
    """(primary metric, -loss) on the validation split: higher is better, ties go to the lower loss."""
    assert site.val_set is not None
    val = metrics_from(predict(model, make_loader(site.val_set, 256, shuffle=False), loss_fn, site.device))
    metric = val.get(primary_metric(site.schema), math.nan)
    return (metric if math.isfinite(metric) else -math.inf), -float(val.get("loss", math.inf))


def fine_tune(model: torch.nn.Module, site: SiteRuntime, cfg: TrainConfig, max_epochs: int,
              server_round: int) -> tuple[torch.nn.Module, int]:
    """A fine-tuned COPY of ``model`` and the epoch count (0..max_epochs) the validation split chose.

    Epoch by epoch on the site's train split, seeded by (seed, round, site) like a train round, at the
    round's learning rate; after each epoch the validation split is scored and the best state kept (epoch 0,
    the model as delivered, included). Without a validation split every epoch is used: there is nothing
    to choose on, and choosing on test would bias the reported metrics.
    """
    tuned = copy.deepcopy(model)
    seed_everything(cfg.seed * 1_000_003 + server_round * 1_009 + site.seed_offset + 7)
    weights = None
    if site.schema.has_classification and cfg.class_weighted:
        weights = class_weights_for(site.train_set.labels, site.schema.num_classes)
    loss_fn = LossFunction(site.schema, weights)
    plain_loss = LossFunction(site.schema)
    loader = make_loader(site.train_set, cfg.batch_size, shuffle=True,
                         seed=cfg.seed + server_round * 7919 + site.seed_offset + 1)
    optimizer = make_optimizer(tuned, cfg, **round_schedule(cfg, server_round))
    has_val = site.val_set is not None and len(site.val_set) > 0
    best_epochs, best_state = 0, None
    best_score = _val_score(tuned, site, plain_loss) if has_val else None
    for epoch in range(1, max_epochs + 1):
        train_epochs(tuned, loader, optimizer, loss_fn, 1, site.device, start_epoch=epoch - 1)
        if not has_val:
            best_epochs = epoch
            continue
        score = _val_score(tuned, site, plain_loss)
        if best_score is None or score > best_score:
            best_score, best_epochs = score, epoch
            best_state = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    if has_val:
        if best_state is None:  # no epoch beat the delivered model on validation
            tuned = copy.deepcopy(model)
        else:
            tuned.load_state_dict(best_state)
    tuned.to("cpu")
    return tuned, best_epochs


def personal_metrics(metrics: Mapping[str, float], epochs: int | None) -> dict[str, float]:
    """The personal model's test metrics as ``personal_*`` keys (counts and validation scores left out:
    the counts equal the global model's, and the validation split chose the epochs, so its scores are biased).
    ``epochs``: the fine-tuning epochs chosen (FedAvg+FT); None for Ditto, which has none to report."""
    out = {f"{PERSONAL_PREFIX}{k}": float(v) for k, v in metrics.items()
           if k not in (NUM_EXAMPLES, VAL_COUNT_KEY, "n", "events") and not k.startswith(VAL_PREFIX)}
    if epochs is not None:
        out[PERSONAL_EPOCHS_KEY] = float(epochs)
    return out


class _TowardGlobal(LossFunction):
    """The task loss plus Ditto's λ/2·||v − w||² over v's trainable parameters, w fixed (the delivered model)."""

    def __init__(self, base: LossFunction, personal: torch.nn.Module, global_model: torch.nn.Module,
                 lam: float) -> None:
        super().__init__(base.schema, base.class_weights)
        anchor = dict(global_model.named_parameters())
        self.pairs = [(p, anchor[name].detach()) for name, p in personal.named_parameters() if p.requires_grad]
        self.lam = lam

    def __call__(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().__call__(outputs, batch)
        pull = sum(((p - w.to(p.device)) ** 2).sum() for p, w in self.pairs)
        return loss + 0.5 * self.lam * pull


def train_personal(personal: torch.nn.Module, global_model: torch.nn.Module, site: SiteRuntime, cfg: TrainConfig,
                   lam: float, server_round: int) -> float:
    """Ditto's personal step: ``cfg.epochs`` epochs of ``personal`` (in place) on the site's train split,
    pulled toward ``global_model`` (left unchanged) by λ/2·||v − w||²; returns the last epoch's mean loss.

    Seeded by (seed, round, site) like a train round but with its own offset, so it neither repeats the
    global update's batches nor disturbs its randomness (it runs after that update is computed).
    """
    seed_everything(cfg.seed * 1_000_003 + server_round * 1_009 + site.seed_offset + 13)
    weights = None
    if site.schema.has_classification and cfg.class_weighted:
        weights = class_weights_for(site.train_set.labels, site.schema.num_classes)
    global_model.to(site.device)
    loss_fn = _TowardGlobal(LossFunction(site.schema, weights), personal.to(site.device), global_model, lam)
    loader = make_loader(site.train_set, cfg.batch_size, shuffle=True,
                         seed=cfg.seed + server_round * 7919 + site.seed_offset + 2)
    optimizer = make_optimizer(personal, cfg, **round_schedule(cfg, server_round))
    try:
        losses = train_epochs(personal, loader, optimizer, loss_fn, cfg.epochs, site.device,
                              start_epoch=(server_round - 1) * cfg.epochs)
    finally:
        personal.to("cpu")
        global_model.to("cpu")
    return losses[-1] if losses else math.nan


class SitePersonalization:
    """What the ClientApp's handlers call: the run's personalisation settings bound to one site's store."""

    def __init__(self, cfg: FederationConfig, site: SiteRuntime, store: PrivatePartStore | None,
                 ditto: PrivatePartStore | None = None, state_key: tuple[Path, str, str, str] | None = None):
        self.cfg, self.site, self.store, self.ditto = cfg, site, store, ditto
        self.parts = cfg.personal.private_parts
        self._delivered: torch.nn.Module | None = None  # Ditto: this round's global model, as it arrived
        # (state folder, site, study, config hash): names the per-case prediction files; None: none are kept
        self.state_key = state_key

    @classmethod
    def for_site(cls, cfg: FederationConfig, site: SiteRuntime, node_config: Mapping[str, Any],
                 run_config: Mapping[str, Any]) -> SitePersonalization:
        """The site's store lives in its state folder: the folder of its privacy ledger."""
        store = ditto = key = None
        personal = cfg.personal
        if personal.private_parts or personal.ditto_lambda > 0 or personal.finetune_epochs > 0:
            folder = Path(site_policy(node_config, run_config, site.site_id).ledger).parent
            key = (folder, site.site_id, study_name(cfg, site.schema), cfg.config_hash())
            if personal.private_parts:
                store = PrivatePartStore.in_folder(*key)
            if personal.ditto_lambda > 0:
                ditto = PrivatePartStore.in_folder(*key, kind="ditto")
        return cls(cfg, site, store, ditto, key)

    def keep_predictions(self, model: torch.nn.Module, server_round: int, kind: str) -> Path | None:
        """At the run's last round, write ``model``'s per-case test predictions to the site's state folder
        (module docstring); returns the file, None when nothing is written (another round, no test rows).

        The model is the one whose metrics this evaluation reports, predicted the way
        :meth:`SiteRuntime.evaluate` predicts, so metrics computed from the file equal the reported ones.
        """
        if self.state_key is None or server_round != self.cfg.num_rounds or len(self.site.test_set) == 0:
            return None
        loader = make_loader(self.site.test_set, 256, shuffle=False)
        try:
            pred = predict(model, loader, LossFunction(self.site.schema), self.site.device)
        finally:
            model.to("cpu")
        path = predictions_path(*self.state_key, server_round)
        write_predictions(path, SitePredictions(pred=pred, case_ids=tuple(site_test_case_ids(self.site)),
                                                site_id=self.site.site_id, server_round=server_round, model=kind))
        log.info("site %s, round %d: kept its %s model's per-case test predictions at the site (%s)",
                 self.site.site_id, server_round, kind, path.name)
        return path

    def before_training(self, model: torch.nn.Module, server_round: int) -> None:
        """Round ``server_round`` trains from this site's private part of the previous round it trained;
        Ditto keeps a copy of the delivered global model (its personal model's anchor)."""
        if self.store is not None and (found := self.store.latest(before=server_round)) is not None:
            load_private(model, found[1])
        if self.ditto is not None:
            self._delivered = copy.deepcopy(model)

    def after_training(self, server_round: int) -> None:
        """Ditto: train the site's personal model (from its newest earlier round, else from the delivered
        global model) toward this round's global model, and keep it; nothing of it is sent or charged."""
        if self.ditto is None or self._delivered is None:
            return
        personal = copy.deepcopy(self._delivered)
        if (found := self.ditto.latest(before=server_round)) is not None:
            load_private(personal, found[1])
        loss = train_personal(personal, self._delivered, self.site, self.cfg.train, self.cfg.personal.ditto_lambda,
                              server_round)
        self.ditto.save(server_round, {k: v.detach().cpu().numpy().copy() for k, v in personal.state_dict().items()})
        log.info("site %s, round %d: trained its Ditto personal model (λ %g, last epoch loss %.4f); kept at the site",
                 self.site.site_id, server_round, self.cfg.personal.ditto_lambda, loss)
        self._delivered = None

    def reply_state(self, model: torch.nn.Module, server_round: int) -> dict[str, torch.Tensor]:
        """Keep the private part (on disk before anything leaves), send the shared part only: the tensors
        the reply carries (the caller packs them or wraps them per tensor, common/packing.py)."""
        if self.store is None:
            return dict(model.state_dict())
        self.store.save(server_round, keep_private(model, self.parts))
        return dict(shared_part(model.state_dict(), self.parts))

    def before_evaluation(self, model: torch.nn.Module, server_round: int) -> None:
        """Evaluate the site's own model: the delivered shared part with its newest private part."""
        if self.store is not None and (found := self.store.latest(upto=server_round)) is not None:
            load_private(model, found[1])
        if self.store is not None and not self.cfg.personal.reports_personal:  # this model is the site's own
            self.keep_predictions(model, server_round, "private-parts")

    def finetune_due(self, server_round: int) -> bool:
        """Fine-tune at the run's last round only (cost: N epochs at every site, once)."""
        return self.cfg.personal.finetune_epochs > 0 and server_round == self.cfg.num_rounds

    def personal_due(self, server_round: int) -> bool:
        """Whether this evaluation also reports ``personal_*``: FedAvg+FT at the last round; Ditto at every
        round once the site holds a personal model (one evaluation pass: cheap, and it gives curves)."""
        if self.ditto is not None:
            return self.ditto.latest(upto=server_round) is not None
        return self.finetune_due(server_round)

    def personal_evaluation(self, model: torch.nn.Module, server_round: int) -> dict[str, float]:
        """``personal_*`` test metrics of the site's personal model: its Ditto model (newest up to this
        round), else a fine-tuned copy of ``model`` (nothing of the copy is kept)."""
        if self.ditto is not None and (found := self.ditto.latest(upto=server_round)) is not None:
            personal = copy.deepcopy(model)
            load_private(personal, found[1])
            self.keep_predictions(personal, server_round, "ditto")
            return personal_metrics(self.site.evaluate(personal), None)
        tuned, epochs = fine_tune(model, self.site, self.cfg.train, self.cfg.personal.finetune_epochs, server_round)
        log.info("site %s, round %d: fine-tuned a copy for %d of %d epochs (chosen on validation)",
                 self.site.site_id, server_round, epochs, self.cfg.personal.finetune_epochs)
        self.keep_predictions(tuned, server_round, "finetune")
        return personal_metrics(self.site.evaluate(tuned), epochs)
