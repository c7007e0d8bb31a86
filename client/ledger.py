"""The site's privacy ledger: every DP-SGD step a study ever took at this site, in one JSON file.

Why a file and not Opacus' accountant object: a hospital's budget ("never more than ε = 3 on this
study") spans rounds, runs, ClientApp processes (Flower may start one per message) and restarts of
the machine. The ledger keeps, per study, the accountant history Opacus itself uses
(``noise multiplier, sample rate, steps`` per entry) and computes ε from it with
``common.privacy.epsilon_of``; nothing else at the site keeps privacy state.

**Count before sending.** :meth:`PrivacyLedger.charge` checks that the round fits the budget and
durably records its steps *before* the site trains; the update leaves the site only after that.
A crash at any point can therefore over-count (a charged round that never trained), never
under-count (an update that left without being recorded).

**Durable and atomic.** The file is replaced, never edited in place: write a temporary file in the
same folder, ``fsync`` it, ``os.replace`` it over the ledger, ``fsync`` the folder. A reader sees the
old or the new ledger, never half of one. Charges hold an exclusive ``flock`` on ``<ledger>.lock``,
so two ClientApp processes cannot both spend the last of a budget. An unreadable ledger stops
training (restore it from backup; deleting it would forget what was spent).

**A missing ledger is not an empty one** once the site has spent budget. Two witnesses outlive the
ledger file: a marker ``<ledger>.spent`` written with the first charge (it catches the ledger file
deleted or moved on its own), and the site's audit log (``[site] audit-log``, usually in the state
folder), whose train replies record the ε spent. If either shows spending and the ledger file is
gone, every read raises :class:`LedgerMissing`: the site refuses to start and refuses train
messages until the ledger is restored from backup. Only a site with neither (its first start) reads
a missing ledger as empty.

Layout (``format`` 1)::

    {"format": 1, "studies": {"<study>": {"entries": [
        {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8, "time": "...", "run": 7, "round": 3,
         "epsilon_after": 0.91, "delta": 1e-05, "accountant": "rdp"}, ...]}}}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedfusion.common.privacy import calibrate_noise, epsilon_of
from fedfusion.common.privacy_policy import BudgetExceeded, PrivacyError, PrivacyPolicy, PrivacyTerms
from fedfusion.common.results import fsync_dir

FORMAT = 1

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one ClientApp process at a time
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Charge:
    """What one round was charged: the noise it must train with and ε before and after it."""

    study: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float
    epsilon_cap: float
    delta: float


class LedgerMissing(PrivacyError):
    """The ledger file is gone but the site has spent budget before: reading it as empty would reset it."""


class PrivacyLedger:
    """Accountant history per study in ``path``; ε with ``accountant`` (``rdp``, ``prv`` or ``gdp``).

    ``audit_log`` is the site's audit log, consulted only when the ledger file is missing (see the
    module docstring); with ``site_id`` only that site's lines count (sites sharing a host, as in
    the loopback rehearsal, may share one log but keep one ledger each).
    """

    def __init__(self, path: str | Path, accountant: str = "rdp", audit_log: str | Path | None = None,
                 site_id: str | None = None) -> None:
        self.path = Path(path)
        self.accountant = accountant
        self.audit_log = Path(audit_log) if audit_log else None
        self.site_id = site_id

    @classmethod
    def for_policy(cls, policy: PrivacyPolicy, site_id: str | None = None) -> PrivacyLedger:
        """The ledger a site's policy names, with the site's audit log as its witness."""
        return cls(policy.ledger, policy.accountant, audit_log=policy.audit_log or None, site_id=site_id)

    @property
    def marker(self) -> Path:
        """Written with the first charge; its presence without the ledger means the ledger was lost."""
        return self.path.with_name(self.path.name + ".spent")

    def check_present(self) -> None:
        """Raise :class:`LedgerMissing` when the ledger file is gone but the site has spent before."""
        if self.path.exists():
            return
        evidence = self._spending_evidence()
        if evidence:
            raise LedgerMissing(
                f"privacy ledger {self.path} is missing, but this site has spent privacy budget before "
                f"({evidence}); reading it as empty would reset every budget. The site will not train until "
                f"the ledger is restored from backup to {self.path}"
            )

    def _spending_evidence(self) -> str:
        """Why we know this site has charged ε before ("" when nothing says so)."""
        if self.marker.exists():
            return f"marker {self.marker} was written with its first charge"
        if self.audit_log is None or not self.audit_log.is_file():
            return ""
        from fedfusion.client.audit import AuditLogError, iter_records

        try:
            for number, record in enumerate(iter_records(self.audit_log), start=1):
                epsilon = record.get("epsilon")
                mine = self.site_id is None or record.get("site_id") == self.site_id
                if mine and isinstance(epsilon, int | float) and epsilon > 0:
                    return f"audit log {self.audit_log} line {number} records a reply with ε = {epsilon:g}"
        except (AuditLogError, OSError) as err:
            return f"the audit log {self.audit_log} cannot be read to prove otherwise ({err})"
        return ""

    # ---------------------------------------------------------------------------------- reading

    def studies(self) -> dict[str, list[dict[str, Any]]]:
        """Every study's entries, oldest first (a missing ledger file is an empty ledger)."""
        return {name: list(study["entries"]) for name, study in self._read()["studies"].items()}

    def history(self, study: str) -> list[tuple[float, float, int]]:
        """The study's ``(noise multiplier, sample rate, steps)`` entries, Opacus' history format."""
        return _history(self._read(), study)

    def epsilon(self, study: str, delta: float) -> float:
        """ε the study has spent at this site, at ``delta``."""
        return epsilon_of(self.history(study), delta, self.accountant)

    # ---------------------------------------------------------------------------------- charging

    def charge(
        self,
        study: str,
        *,
        sample_rate: float,
        steps: int,
        terms: PrivacyTerms,
        planned_steps: int | None = None,
        note: Mapping[str, Any] | None = None,
    ) -> Charge:
        """Check that ``steps`` more steps fit the study's budget and record them, durably, now.

        The noise multiplier is ``terms.noise_multiplier`` when the run fixed one, else the smallest
        that keeps ``planned_steps`` (this round and the run's remaining rounds, default this round)
        at or under ``terms.epsilon_cap``, never below ``terms.min_noise_multiplier``. Raises
        :class:`BudgetExceeded` (nothing recorded) when the round would pass the study's cap or,
        if the policy sets one, the cap over all studies.
        """
        if steps < 1:
            raise PrivacyError(f"a round must take at least one step, got {steps}")
        with self._locked():
            data = self._read()
            history = _history(data, study)
            cap, delta = terms.epsilon_cap, terms.delta
            try:
                if terms.noise_multiplier is None:
                    sigma = calibrate_noise(
                        history,
                        sample_rate,
                        max(steps, planned_steps or steps),
                        cap,
                        delta,
                        self.accountant,
                        floor=terms.min_noise_multiplier,
                    )
                else:
                    sigma = max(terms.noise_multiplier, terms.min_noise_multiplier)
            except BudgetExceeded as err:
                raise BudgetExceeded(f"study {study!r}: {err}; the site refuses this round") from None
            entry = (sigma, float(sample_rate), int(steps))
            before = epsilon_of(history, delta, self.accountant)
            after = epsilon_of([*history, entry], delta, self.accountant)
            if after > cap:
                raise BudgetExceeded(
                    f"study {study!r}: this round ({steps} steps, noise multiplier {sigma:.4g}, sample rate "
                    f"{sample_rate:.4g}) would bring ε from {before:.4g} to {after:.4g}, past this site's budget of "
                    f"{cap:g} (δ = {delta:g}); the site refuses the round"
                )
            if math.isfinite(terms.epsilon_cap_all_studies):
                everything = [e for name in data["studies"] for e in _history(data, name)] + [entry]
                total = epsilon_of(everything, delta, self.accountant)
                if total > terms.epsilon_cap_all_studies:
                    raise BudgetExceeded(
                        f"study {study!r}: this round would bring ε over all studies at this site to {total:.4g}, "
                        f"past max-epsilon-all-studies = {terms.epsilon_cap_all_studies:g}; the site refuses"
                    )
            record = {
                "noise_multiplier": sigma,
                "sample_rate": float(sample_rate),
                "steps": int(steps),
                "time": datetime.now(UTC).isoformat(),
                "epsilon_after": after,
                "delta": delta,
                "accountant": self.accountant,
                **dict(note or {}),
            }
            data["studies"].setdefault(study, {"entries": []})["entries"].append(record)
            self._write(data)
        return Charge(
            study=study,
            noise_multiplier=sigma,
            sample_rate=float(sample_rate),
            steps=int(steps),
            epsilon_before=before,
            epsilon_after=after,
            epsilon_cap=cap,
            delta=delta,
        )

    def record(
        self, study: str, noise_multiplier: float, sample_rate: float, steps: int, note: Mapping[str, Any] | None = None
    ) -> None:
        """Record steps unconditionally (steps that were taken beyond a charge must still count)."""
        with self._locked():
            data = self._read()
            data["studies"].setdefault(study, {"entries": []})["entries"].append(
                {
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "time": datetime.now(UTC).isoformat(),
                    "accountant": self.accountant,
                    **dict(note or {}),
                }
            )
            self._write(data)

    # ---------------------------------------------------------------------------------- storage

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            self.check_present()  # raises when the site has spent before: missing is not empty
            return {"format": FORMAT, "studies": {}}
        except OSError as err:
            raise PrivacyError(
                f"privacy ledger {self.path} cannot be read ({err}); the site will not train until it can"
            ) from None
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or not isinstance(data.get("studies"), dict):
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            for name, study in data["studies"].items():
                for entry in study["entries"]:
                    if not (
                        float(entry["noise_multiplier"]) >= 0
                        and 0 < float(entry["sample_rate"]) <= 1
                        and int(entry["steps"]) >= 0
                    ):
                        raise ValueError(f"study {name!r} holds an invalid entry {entry}")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise PrivacyError(
                f"privacy ledger {self.path} is damaged ({err}); the site will not train until it is "
                "restored from backup (deleting it would forget what was spent)"
            ) from None
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            handle.write(json.dumps(data, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        if not self.marker.exists():
            self.marker.write_text(f"{self.path.name} first charged {datetime.now(UTC).isoformat()}\n")
        fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _history(data: Mapping[str, Any], study: str) -> list[tuple[float, float, int]]:
    entries = data["studies"].get(study, {"entries": []})["entries"]
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]




def status_rows(ledger: PrivacyLedger, max_epsilon: float, delta: float) -> list[dict[str, Any]]:
    """One row per study: rounds charged, steps, ε spent at ``delta`` and what remains of ``max_epsilon``."""
    rows = []
    for name, entries in sorted(ledger.studies().items()):
        spent = ledger.epsilon(name, delta)
        rows.append(
            {
                "study": name,
                "rounds": len(entries),
                "steps": sum(int(e["steps"]) for e in entries),
                "epsilon": spent,
                "max_epsilon": max_epsilon,
                "remaining": max(max_epsilon - spent, 0.0) if math.isfinite(max_epsilon) else math.inf,
                "last": entries[-1].get("time", "") if entries else "",
            }
        )
    return rows


def privacy_status(site_config: str | Path, as_json: bool = False) -> int:
    """``fedfusion privacy status site.toml``: each study's spent and remaining budget at this site."""
    from fedfusion.client.daemon import SiteConfig
    from fedfusion.common.config import ConfigError

    try:
        cfg = SiteConfig.load(site_config)
        policy = cfg.privacy
        ledger = PrivacyLedger.for_policy(policy, cfg.site_id)
        rows = status_rows(ledger, policy.max_epsilon, policy.delta)
    except (ConfigError, PrivacyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if as_json:
        print(
            json.dumps(
                {
                    "ledger": str(ledger.path),
                    "delta": policy.delta,
                    "accountant": policy.accountant,
                    "max_epsilon": policy.max_epsilon,
                    "studies": rows,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    budget = f"max ε {policy.max_epsilon:g} per study" if policy.required else "no [privacy] policy"
    print(f"site {cfg.site_id}: ledger {ledger.path} ({budget}, δ = {policy.delta:g}, accountant {policy.accountant})")
    if not rows:
        print("no study has spent any privacy budget at this site yet")
        return 0
    header = f"{'study':<28} {'rounds':>6} {'steps':>8} {'ε spent':>9} {'ε max':>7} {'remaining':>9}  last charge"
    print(header)
    for r in rows:
        print(
            f"{r['study']:<28} {r['rounds']:>6} {r['steps']:>8} {r['epsilon']:>9.4f} {r['max_epsilon']:>7g} "
            f"{r['remaining']:>9.4f}  {r['last']}"
        )
    if math.isfinite(policy.max_epsilon_all_studies):
        everything = [e for name in ledger.studies() for e in ledger.history(name)]
        total = epsilon_of(everything, policy.delta, policy.accountant)
        print(f"all studies together: ε {total:.4f} of {policy.max_epsilon_all_studies:g}")
    return 0
