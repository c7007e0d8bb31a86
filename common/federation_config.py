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
    "schema": "",
    "run-dir": "runs/latest",
    "resume": False,
    "data-dir": "",
    "sites": "",
    "local-epochs": 2,
    "local-batch-size": 64,
    "local-lr": 1e-3,
    "local-weight-decay": 1e-4,
    "local-device": "auto",
    "fusion": "attention",
    "image-backbone": "cnn_small",
}

# Keys that may differ between an interrupted run and its resumption without changing the result.
_RESUME_NEUTRAL = ("resume", "run-dir", "round-timeout", "num-server-rounds")


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

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        flat = {**DEFAULTS, **dict(run_config)}
        try:
            train = from_flat(TrainConfig, flat, prefix="local-")
            train = TrainConfig(**{**asdict(train), "seed": int(flat["seed"])})
            model = from_flat(ModelConfig, flat)
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
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config: {err}") from None
        if cfg.num_rounds < 1:
            raise ConfigError(f"run config: num-server-rounds must be >= 1, got {cfg.num_rounds}")
        if cfg.min_sites < 1:
            raise ConfigError(f"run config: min-sites must be >= 1, got {cfg.min_sites}")
        return cfg

    def config_hash(self) -> str:
        """Hash of everything that determines the result; a resume with another hash is refused."""
        stable = {k: v for k, v in sorted(self.raw.items()) if k not in _RESUME_NEUTRAL}
        return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
