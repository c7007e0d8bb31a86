"""The run config of a federation, parsed once from Flower's flat hyphenated keys.

Both apps read the same keys (``[tool.flwr.app.config]`` in pyproject.toml, overridden with
``flwr run . CONN --run-config "k=v"`` or by ``fedfusion simulate``): the server to build the
initial model and the strategy, every site to build the identical model and train it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedfusion.common.config import ConfigError, ModelConfig, TrainConfig, from_flat
from fedfusion.common.personalization import Personalization
from fedfusion.common.privacy_policy import PrivacyRequest
from fedfusion.common.secagg.settings import SecureAggregationSettings

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "strategy": "fedavg",
    "min-sites": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "seed": 0,
    "round-timeout": 3600.0,
    # Which round's model the run delivers (server/model_selection.py): best-val-loss | best-val | last
    "model-selection": "best-val",
    "model-selection-min-round": 0,  # earlier rounds are never delivered; 0 = auto, max(2, rounds // 3); 1 = none
    "model-selection-window": 1,  # odd; > 1 ranks a round by the mean of it and its neighbours
    "schema": "",
    "run-dir": "runs/latest",
    "resume": False,
    "data-dir": "",
    "sites": "",
    # Scale simulation (simulations/scale_sites.py): > 0 virtual sites drawn from <data-dir>/manifest.csv
    "scale-sites": 0,
    "scale-rows-per-site": 50,  # distinct real rows per virtual site (reused ACROSS sites: with replacement)
    "scale-test-fraction": 0.2,  # per-site test share, stratified by the target (>= 1 row)
    "scale-cache-size": 1,  # virtual-site runtimes kept built per process (LRU)
    "local-epochs": 2,
    "local-batch-size": 64,
    "local-lr": 1e-3,
    "local-weight-decay": 1e-4,
    "local-device": "auto",
    "fusion": "attention",
    "image-backbone": "cnn_small",
    "image-encoders": "separate",  # multi-sequence schemas: separate | shared (one encoder + sequence embedding)
    # Optimiser and lr schedule (common/training.py); the schedule's unit is the server round.
    "local-optimizer": "adamw",  # adam | adamw | sgd | rmsprop
    "local-momentum": 0.9,  # sgd and rmsprop
    "lr-schedule": "constant",  # constant | cosine | step | warmup_cosine
    "lr-warmup": 0,  # warmup_cosine: rounds of linear warmup
    "lr-step-size": 10,  # step: rounds between decays
    "lr-gamma": 0.1,  # step: decay factor
    "lr-min-factor": 0.0,  # cosine: final lr as a fraction of local-lr
    # Transfer learning (docs/transfer-learning.md): a local file, present at every site
    "pretrained-path": "",
    "pretrained-min-fraction": 1.0,  # < 1: accept a partly matching file if this share of tensors loaded
    "freeze-backbone": False,
    "trainable-blocks": 0,  # > 0: train only the image backbone's last N blocks/stages
    "backbone-lr-scale": 1.0,  # the image backbone's lr relative to local-lr
    # Privacy (common/privacy.py). The ledger key: ε budgets are per study ("" = the schema's name).
    "study": "",
    "dp-mode": "off",  # off | sample (DP-SGD at every site) | client (central DP, Flower's wrapper)
    "target-epsilon": 0.0,  # sample: ε the study may reach at each site; 0 = each site's max-epsilon
    "target-delta": 0.0,  # 0 = each site's delta
    "dp-max-grad-norm": 0.0,  # per-sample clipping norm; 0 = each site's max-grad-norm
    "dp-noise-multiplier": 0.0,  # 0 = each site calibrates it to end the planned rounds within budget
    "dp-grad-sample-mode": "auto",  # auto (fused where it applies, else hooks) | fused | hooks | ghost | functorch
    "dp-physical-batch-size": 0,  # > 0: Opacus' BatchMemoryManager caps the batch through the model
    "client-dp-noise-multiplier": 1.0,  # client mode: server noise, in units of the clipping norm
    "client-dp-clipping-norm": 1.0,  # client mode: each site's update is clipped to this L2 norm
    "sim-privacy-policy": "",  # simulation: TOML file with the simulated sites' [privacy] policies
    # Secure aggregation (common/secagg/settings.py, server/secure_aggregation.py): the server unmasks sums only.
    "secure-aggregation": False,
    "secagg-clip": 1.0,  # each entry of a site's update (weight change in one round) is clipped to ±clip
    "secagg-bits": 32,  # masking modulus bits (32: masked vector as large as a float32 update)
    "secagg-threshold": 0,  # share holders needed to recover a secret; 0 = two thirds of them
    # with 2 sites each site could subtract its own update from the sum and learn the other's
    "secagg-allow-two-sites": False,
    "secagg-weight-bound": 100000.0,  # largest example count a site may report
    "secagg-timeout": 600.0,  # seconds per key-exchange stage (stage 1 trains: round-timeout)
    # Experiment tracking on the coordinator (server/tracking.py, docs/tracking.md); the `tracking` extra
    "tracking": "",  # "" (off) | tensorboard | mlflow | tensorboard,mlflow
    "tracking-dir": "",  # parent of tensorboard/ and mlruns/; "" = the run folder
    "mlflow-tracking-uri": "",  # "" = the local file store <tracking-dir>/mlruns; a URI names a server/database
    "mlflow-experiment": "fedfusion",
    # Reply attribution (server/reply_attribution.py): the coordinator kit's roster.json; every reply must
    # be signed by the roster site it names. `fedfusion run` fills it from `coordinator start --kit`.
    "roster": "",
    "sim-min-eval-cases": 0,  # simulation: smallest split whose metrics are released (client/eval_release.py)
    # Personalisation (common/personalization.py, client/personalization.py)
    "private-parts": "",  # groups each site keeps and never sends: "head" (FedPer), "fusion", a modality
    "personal-finetune-epochs": 0,  # > 0: at the last round's evaluation each site fine-tunes a copy (FedAvg+FT)
    "ditto-lambda": 0.0,  # > 0 (Ditto): each site also trains its own model, pulled toward the global by λ/2·||v−w||²
}

# TrainConfig fields whose run-config keys have no ``local-`` prefix (they are federation-wide).
_UNPREFIXED_TRAIN_KEYS = ("lr_schedule", "lr_warmup", "lr_step_size", "lr_gamma", "lr_min_factor",
                          "backbone_lr_scale")

# Keys that may differ between an interrupted run and its resumption without changing the result.
_RESUME_NEUTRAL = ("resume", "run-dir", "round-timeout", "num-server-rounds", "secagg-timeout", "scale-cache-size",
                   "model-selection", "model-selection-min-round", "model-selection-window",
                   "tracking", "tracking-dir", "mlflow-tracking-uri", "mlflow-experiment")
#: run config ``model-selection`` (server/model_selection.py)
MODEL_SELECTIONS = ("best-val-loss", "best-val", "last")


@dataclass(frozen=True)
class FederationConfig:
    """Settings the coordinator chooses for a run; sites add their own node config on top."""

    num_rounds: int
    strategy: str
    min_sites: int
    fraction_train: float
    fraction_evaluate: float
    proximal_mu: float
    server_lr: float
    seed: int
    round_timeout: float
    schema: str
    run_dir: str
    resume: bool
    data_dir: str
    sites: tuple[str, ...]
    model: ModelConfig
    train: TrainConfig
    raw: Mapping[str, Any]
    study: str = ""
    privacy: PrivacyRequest = PrivacyRequest()
    secure: SecureAggregationSettings = SecureAggregationSettings()
    model_selection: str = "best-val"
    model_selection_min_round: int = 0
    model_selection_window: int = 1
    personal: Personalization = Personalization()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        flat = {**DEFAULTS, **dict(run_config)}
        try:
            train = from_flat(TrainConfig, flat, prefix="local-")
            unprefixed = {k: flat[k.replace("_", "-")] for k in _UNPREFIXED_TRAIN_KEYS}
            train = TrainConfig(**{**asdict(train), **unprefixed, "seed": int(flat["seed"]),
                                   "lr_horizon": int(flat["num-server-rounds"])})
            model = from_flat(ModelConfig, {**flat, "pretrained-path": flat["pretrained-path"] or None})
            cfg = cls(
                num_rounds=int(flat["num-server-rounds"]),
                strategy=str(flat["strategy"]),
                min_sites=int(flat["min-sites"]),
                fraction_train=float(flat["fraction-train"]),
                fraction_evaluate=float(flat["fraction-evaluate"]),
                proximal_mu=float(flat["proximal-mu"]),
                server_lr=float(flat["server-lr"]),
                seed=int(flat["seed"]),
                round_timeout=float(flat["round-timeout"]),
                schema=str(flat["schema"]),
                run_dir=str(flat["run-dir"]),
                resume=bool(flat["resume"]),
                data_dir=str(flat["data-dir"]),
                sites=tuple(s for s in str(flat["sites"]).split(",") if s),
                model=model,
                train=train,
                raw=flat,
                study=str(flat["study"]),
                privacy=PrivacyRequest.from_run_config(flat),
                secure=SecureAggregationSettings.from_run_config(flat),
                model_selection=str(flat["model-selection"]),
                model_selection_min_round=int(flat["model-selection-min-round"]),
                model_selection_window=int(flat["model-selection-window"]),
                personal=Personalization.from_run_config(flat),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config: {err}") from None
        if cfg.num_rounds < 1:
            raise ConfigError(f"run config: num-server-rounds must be >= 1, got {cfg.num_rounds}")
        if cfg.min_sites < 1:
            raise ConfigError(f"run config: min-sites must be >= 1, got {cfg.min_sites}")
        if cfg.model_selection not in MODEL_SELECTIONS:
            raise ConfigError(f"run config: model-selection must be one of {list(MODEL_SELECTIONS)}, "
                              f"got {cfg.model_selection!r}")
        if cfg.model_selection_min_round < 0:
            raise ConfigError("run config: model-selection-min-round must be >= 0 (0 = auto, 1 = every round), "
                              f"got {cfg.model_selection_min_round}")
        if cfg.model_selection_window < 1 or cfg.model_selection_window % 2 == 0:
            raise ConfigError("run config: model-selection-window must be an odd number >= 1, "
                              f"got {cfg.model_selection_window}")
        if cfg.personal.private_parts and cfg.privacy.mode == "client":
            raise ConfigError("run config: private-parts does not combine with dp-mode = \"client\" (Flower's "
                              "client-side clipping compares the whole model with the reply); use dp-mode = \"sample\"")
        return cfg

    def config_hash(self) -> str:
        """Hash of everything that determines the result; a resume with another hash is refused."""
        stable = {k: v for k, v in sorted(self.raw.items()) if k not in _RESUME_NEUTRAL}
        return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
