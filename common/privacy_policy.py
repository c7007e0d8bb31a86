"""What a site allows, what a run asks, and the terms a round trains under (sample-level DP).

:class:`PrivacyPolicy` is the site's own rule (``site.toml`` ``[privacy]``, or a simulation's
``sim-privacy-policy`` file): the largest ε per study at which δ, the largest per-sample clipping
norm, the smallest noise multiplier, the accountant and the ledger file. :class:`PrivacyRequest` is
what the coordinator's run config asks for. :func:`negotiate` gives the terms a round trains under:
the request may be stronger than the policy (lower ε, lower δ, lower clipping norm, more noise),
never weaker; a weaker request raises :class:`PrivacyError` naming the run-config key, and the site
refuses the round instead of training under other terms.

No torch, no Opacus: the server, the site daemon and the CLI parse policies and requests cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ACCOUNTANTS = ("rdp", "prv", "gdp")
DP_MODES = ("off", "sample", "client")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "fused", "auto")  # fused/auto: common/dp_fused.py
DEFAULT_DELTA = 1e-5
LEDGER_FILENAME = "privacy-ledger.json"
#: Node-config keys (``--node-config``) that carry a site's policy to its ClientApp.
NODE_CONFIG_PREFIX = "privacy-"


class PrivacyError(ValueError):
    """A privacy setting is invalid, or weaker than the site allows; the message names the setting."""


class BudgetExceeded(PrivacyError):
    """Training this round would take a study past the site's ε budget: the site refuses the round."""


def _positive(value: Any, name: str, source: str, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"{source}: {name} must be a number, got {value!r}") from None
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise PrivacyError(f"{source}: {name} must be {bound}, got {value!r}")
    return number


# --------------------------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class PrivacyPolicy:
    """What a site allows for sample-level DP (``site.toml`` ``[privacy]``).

    ``max_epsilon`` is the most ε (at ``delta``) the site spends on one study, over every round, run
    and restart; ``max_epsilon_all_studies`` caps all studies together. The coordinator names the
    study, so a per-study cap alone could be escaped by renaming it: a ``[privacy]`` table without
    ``max-epsilon-all-studies`` therefore caps all studies at ``max-epsilon`` too (a site that wants
    several studies raises it explicitly). ``required`` is True when the site wrote a
    ``[privacy]`` table: it then trains only with sample-level DP-SGD. A site without one has the
    defaults below, enforces nothing and follows the run's request (which must then name a finite
    ``target-epsilon``). ``ledger`` is the ledger file's path ("" = the caller's default);
    ``audit_log`` the site's audit log, which the ledger consults when its file is missing (a site
    whose log shows ε spent must not read a deleted ledger as an empty one, see client/ledger.py).
    """

    max_epsilon: float = math.inf
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    min_noise_multiplier: float = 0.0
    accountant: str = "rdp"
    max_epsilon_all_studies: float = math.inf
    ledger: str = ""
    required: bool = False
    audit_log: str = ""

    #: ``[privacy]`` table keys (also the node-config keys, with ``privacy-`` in front).
    KEYS = {
        "max-epsilon": "max_epsilon",
        "delta": "delta",
        "max-grad-norm": "max_grad_norm",
        "min-noise-multiplier": "min_noise_multiplier",
        "accountant": "accountant",
        "max-epsilon-all-studies": "max_epsilon_all_studies",
        "ledger": "ledger",
    }

    def __post_init__(self) -> None:
        source = "privacy policy"
        _positive(self.max_epsilon, "max-epsilon", source)
        _positive(self.max_epsilon_all_studies, "max-epsilon-all-studies", source)
        _positive(self.max_grad_norm, "max-grad-norm", source)
        _positive(self.min_noise_multiplier, "min-noise-multiplier", source, allow_zero=True)
        if not 0 < float(self.delta) < 1:
            raise PrivacyError(
                f"{source}: delta must be in (0, 1), got {self.delta!r} "
                "(usually well below 1 / number of patients, e.g. 1e-5)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"{source}: accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str, base_dir: Path | None = None) -> PrivacyPolicy:
        """Parse a ``[privacy]`` table; ``ledger`` resolves against ``base_dir`` when relative."""
        unknown = sorted(set(table) - set(cls.KEYS))
        if unknown:
            raise PrivacyError(f"{source}: unknown [privacy] keys {unknown}; expected some of {sorted(cls.KEYS)}")
        if "max-epsilon" not in table:
            raise PrivacyError(f"{source}: [privacy] needs max-epsilon (the most ε this site spends on one study)")
        kwargs: dict[str, Any] = {}
        for key, attr in cls.KEYS.items():
            if key not in table:
                continue
            value = table[key]
            if attr in ("accountant", "ledger"):
                kwargs[attr] = str(value)
            else:
                kwargs[attr] = _positive(value, f"[privacy] {key}", source, allow_zero=attr == "min_noise_multiplier")
        if "max_epsilon_all_studies" not in kwargs:  # renaming the study must not buy a fresh budget
            kwargs["max_epsilon_all_studies"] = kwargs["max_epsilon"]
        ledger = kwargs.get("ledger", "")
        if ledger and base_dir is not None and not Path(ledger).is_absolute():
            kwargs["ledger"] = str((base_dir / ledger).resolve())
        try:
            return cls(**kwargs, required=True)
        except PrivacyError as err:
            raise PrivacyError(f"{source}: {err}") from None

    def node_config(self) -> dict[str, str]:
        """``--node-config`` pairs carrying this policy (only the ledger when the site set none)."""
        pairs = {f"{NODE_CONFIG_PREFIX}ledger": self.ledger} if self.ledger else {}
        if self.required:
            for key, attr in self.KEYS.items():
                if attr != "ledger":
                    pairs[NODE_CONFIG_PREFIX + key] = str(getattr(self, attr))
        return pairs

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], default_ledger: str | Path = "") -> PrivacyPolicy:
        """The policy a SuperNode was started with (see :meth:`node_config`); ``audit-log`` is the
        site's audit log (set by ``site start``), the ledger's witness of budget already spent."""
        table = {k[len(NODE_CONFIG_PREFIX) :]: v for k, v in node_config.items() if k.startswith(NODE_CONFIG_PREFIX)}
        ledger = str(table.pop("ledger", "") or default_ledger)
        audit_log = str(node_config.get("audit-log", "") or "")
        if "max-epsilon" not in table:
            return cls(ledger=ledger, audit_log=audit_log)
        return replace(cls.from_table(table, "node config"), ledger=ledger, audit_log=audit_log)


def simulated_site_policy(path: str | Path, site: str) -> PrivacyPolicy:
    """Policy of simulated site ``site`` from the run config's ``sim-privacy-policy`` TOML file.

    The file holds ``[privacy]`` (every simulated site) and ``[privacy.sites.<name>]`` (one site's
    overrides), with the keys of ``site.toml``'s ``[privacy]``; a site whose merged table has no
    ``max-epsilon`` has no policy. ``ledger`` may contain ``{site}``; by default each site's ledger
    is ``privacy-ledger-<site>.json`` beside the file.
    """
    import tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PrivacyError(f"sim-privacy-policy: file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise PrivacyError(f"sim-privacy-policy: {path} is not valid TOML ({err})") from None
    table = dict(raw.get("privacy", {}))
    overrides = table.pop("sites", {})
    table.update(overrides.get(site, {}))
    ledger = str(table.pop("ledger", "privacy-ledger-{site}.json")).replace("{site}", site)
    ledger = ledger if Path(ledger).is_absolute() else str((path.parent / ledger).resolve())
    if "max-epsilon" not in table:
        return PrivacyPolicy(ledger=ledger)
    return replace(PrivacyPolicy.from_table(table, f"{path} (site {site})"), ledger=ledger)


@dataclass(frozen=True)
class PrivacyRequest:
    """What the coordinator's run config asks for (0 means "the site's own value").

    ``mode``: ``off``; ``sample`` (DP-SGD at every site, per-sample (ε, δ), budgets enforced by the
    sites); ``client`` (central DP: sites clip their update, the server adds noise; protects against
    whoever sees the final model, not against the server). ``noise_multiplier`` fixes σ; 0 lets each
    site calibrate σ so the run's planned rounds end at or under its budget.
    """

    mode: str = "off"
    target_epsilon: float = 0.0
    target_delta: float = 0.0
    max_grad_norm: float = 0.0
    noise_multiplier: float = 0.0
    grad_sample_mode: str = "auto"
    physical_batch_size: int = 0
    client_noise_multiplier: float = 1.0
    client_clipping_norm: float = 1.0

    #: run-config key -> field
    KEYS = {
        "dp-mode": "mode",
        "target-epsilon": "target_epsilon",
        "target-delta": "target_delta",
        "dp-max-grad-norm": "max_grad_norm",
        "dp-noise-multiplier": "noise_multiplier",
        "dp-grad-sample-mode": "grad_sample_mode",
        "dp-physical-batch-size": "physical_batch_size",
        "client-dp-noise-multiplier": "client_noise_multiplier",
        "client-dp-clipping-norm": "client_clipping_norm",
    }

    def __post_init__(self) -> None:
        source = "run config"
        if self.mode not in DP_MODES:
            raise PrivacyError(f"{source}: dp-mode must be one of {DP_MODES}, got {self.mode!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(
                f"{source}: dp-grad-sample-mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}"
            )
        for key, attr in self.KEYS.items():
            if attr not in ("mode", "grad_sample_mode"):
                _positive(getattr(self, attr), key, source, allow_zero=True)
        if self.target_delta >= 1:
            raise PrivacyError(f"{source}: target-delta must be below 1, got {self.target_delta}")
        if self.mode == "client" and (self.client_noise_multiplier <= 0 or self.client_clipping_norm <= 0):
            raise PrivacyError(
                f'{source}: dp-mode = "client" needs client-dp-noise-multiplier > 0 and client-dp-clipping-norm > 0'
            )

    @classmethod
    def from_run_config(cls, flat: Mapping[str, Any]) -> PrivacyRequest:
        kwargs: dict[str, Any] = {}
        for key, attr in cls.KEYS.items():
            if key in flat:
                value = flat[key]
                if attr in ("mode", "grad_sample_mode"):
                    kwargs[attr] = str(value)
                elif attr == "physical_batch_size":
                    kwargs[attr] = int(value)
                else:
                    kwargs[attr] = _positive(value, key, "run config", allow_zero=True)
        return cls(**kwargs)


@dataclass(frozen=True)
class PrivacyTerms:
    """What one round trains under: the policy and the request, the stronger of each."""

    epsilon_cap: float
    delta: float
    max_grad_norm: float
    min_noise_multiplier: float
    noise_multiplier: float | None  # None: calibrate for the planned rounds
    accountant: str
    epsilon_cap_all_studies: float = math.inf
    grad_sample_mode: str = "auto"
    physical_batch_size: int = 0


def negotiate(policy: PrivacyPolicy, request: PrivacyRequest) -> PrivacyTerms | None:
    """The round's terms, None when the round trains without sample-level DP.

    Raises :class:`PrivacyError` naming the run-config key when the request is weaker than the
    site's policy; the site then refuses the round (it never silently trains under other terms).
    """
    where = "this site's privacy policy (site.toml [privacy])"
    if request.mode != "sample":
        if policy.required:
            raise PrivacyError(
                f"dp-mode: {where} requires sample-level DP-SGD (max-epsilon = {policy.max_epsilon:g}); the run asks "
                f'for dp-mode = {request.mode!r}. Ask the coordinator to run with dp-mode = "sample".'
            )
        return None
    enforce = policy.required
    epsilon = policy.max_epsilon
    if request.target_epsilon > 0:
        if enforce and request.target_epsilon > policy.max_epsilon:
            raise PrivacyError(
                f"target-epsilon: the run asks for ε = {request.target_epsilon:g}, {where} allows at "
                f"most {policy.max_epsilon:g} per study; the coordinator must lower target-epsilon"
            )
        epsilon = min(epsilon, request.target_epsilon)
    if not math.isfinite(epsilon):
        raise PrivacyError(
            "target-epsilon: this site has no privacy policy ([privacy] max-epsilon) and the run sets "
            "no target-epsilon; DP-SGD needs a finite budget"
        )
    delta = policy.delta
    if request.target_delta > 0:
        if enforce and request.target_delta > policy.delta:
            raise PrivacyError(
                f"target-delta: the run asks for δ = {request.target_delta:g}, {where} allows at most "
                f"{policy.delta:g}; the coordinator must lower target-delta"
            )
        delta = request.target_delta
    clip = policy.max_grad_norm
    if request.max_grad_norm > 0:
        if enforce and request.max_grad_norm > policy.max_grad_norm:
            raise PrivacyError(
                f"dp-max-grad-norm: the run asks for a clipping norm of {request.max_grad_norm:g}, "
                f"{where} allows at most {policy.max_grad_norm:g}"
            )
        clip = request.max_grad_norm
    noise: float | None = None
    if request.noise_multiplier > 0:
        if request.noise_multiplier < policy.min_noise_multiplier:
            raise PrivacyError(
                f"dp-noise-multiplier: the run asks for σ = {request.noise_multiplier:g}, {where} "
                f"requires at least {policy.min_noise_multiplier:g}"
            )
        noise = request.noise_multiplier
    return PrivacyTerms(
        epsilon_cap=epsilon,
        delta=delta,
        max_grad_norm=clip,
        min_noise_multiplier=policy.min_noise_multiplier,
        noise_multiplier=noise,
        accountant=policy.accountant,
        epsilon_cap_all_studies=policy.max_epsilon_all_studies,
        grad_sample_mode=request.grad_sample_mode,
        physical_batch_size=request.physical_batch_size,
    )
