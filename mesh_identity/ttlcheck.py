"""The TTL chain: root, intermediate and workload lifetimes and the rotation fraction, checked together.

Run when the server starts (errors refuse the start) and by ``mesh-identity doctor``. Besides errors and
warnings it explains what the numbers mean:

* the **effective workload lifetime**: ``ca.workload_ttl``, cut by the provider's limit (per-workload mode) and
  by the root's remaining life;
* when a workload certificate is renewed, and how long a failing renewal can be retried before it expires
  (the renewal window, ``(1 - rotate_after) * lifetime``);
* the **outage budget**: how long the upstream CA may be unreachable before any certificate expires, in the
  worst case (the outage starts just when a renewal falls due). In intermediate mode workloads keep being
  signed locally, so it is the intermediate's renewal window; in per-workload mode every renewal goes upstream,
  so it is the workload certificate's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mesh_identity.config import Config
from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError
from mesh_identity.provider import CAProvider, Limits, Mode
from mesh_identity.svid import TrustBundle

ERROR = "error"
WARNING = "warning"
NOTE = "note"


@dataclass(frozen=True, slots=True)
class TtlChain:
    """The inputs. ``root_not_after`` is the signing root's NotAfter when known."""

    mode: Mode
    workload_ttl: timedelta
    intermediate_ttl: timedelta
    rotate_after: float
    jitter: float = 0.0
    root_not_after: datetime | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class Finding:
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class TtlReport:
    findings: tuple[Finding, ...]
    workload_lifetime: timedelta | None = None
    intermediate_lifetime: timedelta | None = None
    renewal_window: timedelta | None = None
    outage_budget: timedelta | None = None

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == WARNING]

    @property
    def notes(self) -> list[str]:
        return [f.message for f in self.findings if f.level == NOTE]

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        return [f"{f.level}: {f.message}" for f in self.findings]

    def require_sound(self) -> None:
        """ConfigError listing every error, when there is one."""
        if self.errors:
            raise ConfigError("the TTL chain is unsound: " + "; ".join(self.errors))


def _fmt(value: timedelta) -> str:
    return format_duration(value)


def check_ttl_chain(chain: TtlChain, now: datetime) -> TtlReport:
    """Check ``chain`` at ``now``: errors, warnings and notes, plus the figures they explain."""
    findings: list[Finding] = []

    def add(level: str, message: str) -> None:
        findings.append(Finding(level, message))

    ra, jitter, limits = chain.rotate_after, chain.jitter, chain.limits
    if isinstance(ra, bool) or not isinstance(ra, int | float) or not 0 < ra < 1:
        add(ERROR, f"ca.rotate_after: {ra!r} is not a fraction strictly between 0 and 1")
        return TtlReport(tuple(findings))
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 0.5:
        add(ERROR, f"ca.jitter: {jitter!r} is not a fraction in [0, 0.5)")
        return TtlReport(tuple(findings))

    root_left = chain.root_not_after - now if chain.root_not_after is not None else None
    if root_left is not None and root_left <= timedelta(0):
        assert chain.root_not_after is not None
        add(ERROR, f"the signing root expired at {chain.root_not_after:%Y-%m-%dT%H:%M:%SZ}: rotate or replace it")
        return TtlReport(tuple(findings))

    intermediate: timedelta | None = None
    if chain.mode is Mode.INTERMEDIATE:
        intermediate = chain.intermediate_ttl
        cut_by = ""
        if limits.max_intermediate_ttl is not None and limits.max_intermediate_ttl < intermediate:
            add(
                WARNING,
                f"the provider signs intermediates for at most {_fmt(limits.max_intermediate_ttl)}; "
                f"ca.intermediate_ttl {_fmt(chain.intermediate_ttl)} is cut to that",
            )
            intermediate, cut_by = limits.max_intermediate_ttl, "the provider's limit"
        if root_left is not None and root_left < intermediate:
            add(
                WARNING,
                f"the root expires in {_fmt(root_left)}, before a new intermediate would: intermediates are cut to "
                "its NotAfter; rotate the root (mesh-identity ca rotate-root prepare)",
            )
            intermediate, cut_by = root_left, "the root's remaining lifetime"
        if chain.workload_ttl >= chain.intermediate_ttl:
            add(
                ERROR,
                f"ca.workload_ttl: {_fmt(chain.workload_ttl)} is not shorter than ca.intermediate_ttl "
                f"{_fmt(chain.intermediate_ttl)}; a workload certificate cannot outlive its issuer",
            )
            return TtlReport(tuple(findings))
        if chain.workload_ttl >= intermediate:
            add(
                ERROR,
                f"ca.workload_ttl: {_fmt(chain.workload_ttl)} is not shorter than the {_fmt(intermediate)} an "
                f"intermediate can live ({cut_by})",
            )
            return TtlReport(tuple(findings))
        workload = chain.workload_ttl
        if workload > intermediate * (1 - ra):
            add(
                WARNING,
                f"ca.workload_ttl {_fmt(workload)} is longer than the intermediate's renewal window "
                f"{_fmt(intermediate * (1 - ra))}: workload certificates issued late in an intermediate's life are "
                "cut to its NotAfter",
            )
        outage = intermediate * (1 - ra)
    else:
        workload = chain.workload_ttl
        if limits.max_workload_ttl is not None and limits.max_workload_ttl < workload:
            add(
                WARNING,
                f"the provider signs workload certificates for at most {_fmt(limits.max_workload_ttl)}; "
                f"ca.workload_ttl {_fmt(chain.workload_ttl)} is cut to that (rotation follows each certificate's "
                "real NotAfter)",
            )
            workload = limits.max_workload_ttl
        if root_left is not None and root_left <= workload:
            add(
                ERROR,
                f"the signing root expires in {_fmt(root_left)}, sooner than a workload certificate's "
                f"{_fmt(workload)}: rotate the root first (mesh-identity ca rotate-root prepare)",
            )
            return TtlReport(tuple(findings))
        outage = workload * (1 - ra)

    window = workload * (1 - ra)
    if ra > 0.9:
        add(
            WARNING,
            f"ca.rotate_after {ra} leaves only {_fmt(window)} ({(1 - ra):.0%} of each lifetime) to retry a "
            "failed renewal before the certificate expires",
        )
    earliest, latest = workload * (ra * (1 - jitter)), workload * ra
    renewed = _fmt(latest) if earliest == latest else f"{_fmt(earliest)} to {_fmt(latest)}"
    add(
        NOTE,
        f"workload certificates live {_fmt(workload)} and are renewed {renewed} after issue "
        f"(rotate_after {ra}, jitter {jitter}); a failing renewal is retried for {_fmt(window)} before the "
        "certificate expires",
    )
    if intermediate is not None:
        add(
            NOTE,
            f"the intermediate lives {_fmt(intermediate)} and is renewed {_fmt(intermediate * ra)} after issue; "
            "workloads move to a new intermediate at their own next renewal",
        )
        add(
            NOTE,
            f"outage budget: the upstream CA may be unreachable for {_fmt(outage)} before anything expires "
            "(workload certificates keep being signed locally by the intermediate)",
        )
    else:
        add(
            NOTE,
            f"outage budget: the upstream CA may be unreachable for {_fmt(outage)} before a workload certificate "
            "expires (every renewal goes upstream)",
        )
    add(NOTE, f"if mesh-identity itself stops, workload certificates stay valid for at least {_fmt(window)}")
    if chain.root_not_after is not None and root_left is not None:
        add(NOTE, f"the signing root expires {chain.root_not_after:%Y-%m-%dT%H:%M:%SZ} (in {_fmt(root_left)})")
    for note in limits.notes:
        add(NOTE, f"provider: {note}")
    return TtlReport(tuple(findings), workload, intermediate, window, outage)


def chain_for(config: Config, provider: CAProvider, bundle: TrustBundle | None = None) -> TtlChain:
    """The TTL chain of ``config`` with what ``provider`` says of its limits; the root's NotAfter is the
    provider's ``ca_not_after`` or else the earliest expiry in ``bundle``."""
    limits = provider.limits()
    root_not_after = limits.ca_not_after
    if root_not_after is None and bundle is not None:
        root_not_after = min(cert.not_valid_after_utc for cert in bundle.authorities)
    return TtlChain(
        mode=config.ca.mode,
        workload_ttl=config.ca.workload_ttl,
        intermediate_ttl=config.ca.intermediate_ttl,
        rotate_after=config.ca.rotate_after,
        jitter=config.ca.jitter,
        root_not_after=root_not_after,
        limits=limits,
    )
