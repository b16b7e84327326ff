"""``serve``, ``status``, ``doctor``, ``ca status`` and ``ca rotate-root``.

``serve`` runs the :class:`~mesh_identity.rotation.service.Service`; the other commands talk to it over its
endpoint (the URL in ``<state_dir>/admin.addr``, else ``metrics.listen``), root rotation steps with the bearer
token from ``<state_dir>/admin.token``. ``doctor`` and the offline part of ``ca status`` need no server.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from mesh_identity.cli.context import config_of, load_plugins
from mesh_identity.cli.mesh import MeshControl, attach, identities_for, mesh_of
from mesh_identity.clock import utcnow
from mesh_identity.config import Config
from mesh_identity.durations import format_duration
from mesh_identity.errors import MeshIdentityError
from mesh_identity.provider import CAProvider
from mesh_identity.rotation.endpoint import ROOT_STEPS
from mesh_identity.rotation.service import ADMIN_ADDR, ADMIN_TOKEN, DEFAULT_LISTEN, Service
from mesh_identity.runtime import build_provider
from mesh_identity.svid import fingerprint_of, serial_of
from mesh_identity.ttlcheck import TtlChain, chain_for, check_ttl_chain
from plugins.manager import Plugins

log = logging.getLogger(__name__)
GET_TIMEOUT = 30.0
STEP_TIMEOUT = 900.0  # activating renews every identity at once


class ServerError(MeshIdentityError):
    """The server could not be reached, or answered with an error."""


# -- building ------------------------------------------------------------------------------------------------


def _provider(args: argparse.Namespace, config: Config, *, create: bool) -> tuple[Plugins, CAProvider]:
    plugins = load_plugins(args)
    plugins.configure(
        {"trust_domain": config.trust_domain.name, "state_dir": config.state_dir, "plugins": config.plugins}
    )
    spec = plugins.provider(config.ca.provider)
    options = plugins.validate_provider_options(spec.name, config.ca.provider_options)
    return plugins, build_provider(config, spec, options, create=create)


def build_service(args: argparse.Namespace) -> tuple[Service, MeshControl | None]:
    """The service ``serve`` runs and, when the config has a mesh (``mesh_file`` or ``xds.listen``), the xDS
    server joined to it (see :mod:`mesh_identity.cli.mesh`)."""
    config = config_of(args)
    mesh = mesh_of(config)
    plugins, provider = _provider(args, config, create=True)
    service = Service(config, provider, events=plugins, identities=identities_for(config, mesh))
    return service, (attach(service, mesh) if mesh is not None else None)


# -- serve ---------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.debug:
        logging.getLogger("mesh_identity").setLevel(logging.INFO)
    service, control = build_service(args)
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.put(signum)  # SimpleQueue.put is safe in a signal handler

    handled = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if control is not None else [])]
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        try:
            service.start()
        except BaseException:
            service.stop()
            raise
        try:
            created = getattr(service.provider, "created", False)
            state = service.config.state_dir
            if created:
                print(f"created CA state in {state}")
            count = len(service.engine)
            print(
                f"serving {count} identit{'y' if count == 1 else 'ies'} of {service.config.trust_domain} "
                f"(provider {service.provider.name}, {service.config.ca.mode.value} mode)"
            )
            print(f"  metrics, health and status at {service.url} (admin token in {state / ADMIN_TOKEN})", flush=True)
            if control is not None:
                print(f"  {control.summary()}", flush=True)
            while signals.get() == signal.SIGHUP:
                if control is not None:
                    control.reload()
        finally:
            service.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped")
    return 0


# -- talking to the server -----------------------------------------------------------------------------------


def server_url(config: Config) -> str:
    """The URL of the running server: ``<state_dir>/admin.addr`` when present, else ``metrics.listen``."""
    try:
        return (config.state_dir / ADMIN_ADDR).read_text().strip()
    except OSError:
        listen = config.metrics_listen or DEFAULT_LISTEN
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        return f"http://{host}:{listen.port}"


def _request(url: str, *, token: str | None = None, timeout: float = GET_TIMEOUT) -> tuple[int, bytes]:
    method = "GET" if token is None else "POST"
    request = urllib.request.Request(url, method=method, data=b"" if token is not None else None)  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) URL we built
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServerError(f"cannot reach the server at {url}: {reason} (is 'mesh-identity serve' running?)") from None


def fetch_status(config: Config) -> dict[str, Any]:
    url = server_url(config) + "/status"
    code, body = _request(url)
    if code != 200:
        raise ServerError(f"{url} answered {code}: {body.decode(errors='replace').strip()}")
    data: dict[str, Any] = json.loads(body)
    return data


def _token(config: Config) -> str:
    path = config.state_dir / ADMIN_TOKEN
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ServerError(
            f"cannot read the admin token {path}: {err.strerror} (it is written by a running 'mesh-identity serve')"
        ) from None
    if not token:
        raise ServerError(f"the admin token file {path} is empty")
    return token


# -- status --------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    data = fetch_status(config_of(args))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    now = _parse_time(data["generated_at"])
    provider = data["provider"]
    health = {True: "healthy", False: "UNHEALTHY", None: "not checked"}[provider["healthy"]]
    budget = data["outage_budget_seconds"]
    print(
        f"trust domain {data['trust_domain']}; provider {provider['name']} ({provider['mode']} mode) {health}; "
        f"{'ready' if data['ready'] else 'NOT READY: ' + data['ready_detail']}"
        + (f"; outage budget {_seconds(budget)}" if budget is not None else "")
    )
    _print_ca(data["ca"], now)
    header = ("IDENTITY", "SERIAL", "NOT AFTER", "LEFT", "NEXT ROTATION", "PROVIDER", "LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for ident in data["identities"]:
        rows.append(
            (
                ident["subject"],
                ident["serial"] or "-",
                ident["not_after"] or "-",
                _seconds(ident["seconds_left"]) if ident["seconds_left"] is not None else "-",
                ident["next_rotation"][:19] + "Z" if ident["next_rotation"] else "-",
                ident["provider"],
                (f"[{ident['failures']} failed] " + (ident["last_error"] or "")) if ident["failures"] else "-",
            )
        )
    print()
    _print_table(rows)
    return 0


def _print_ca(ca: dict[str, Any], now: datetime) -> None:
    print(f"root rotation: {ca['phase']} ({ca['next_step']})")
    for root in ca["roots"]:
        notes = [
            *(["signing"] if root["signing"] else []),
            *(["new"] if root["new"] else []),
            f"{root['leaves']} leaves",
        ]
        print(
            f"  root          {root['serial']}  expires {root['not_after']} ({_seconds(root['seconds_left'])})  "
            + ", ".join(notes)
        )
    inter = ca.get("intermediate")
    if inter:
        line = f"  intermediate  {inter['serial'] or '-'}  expires {inter['not_after'] or '-'}"
        if inter["seconds_left"] is not None:
            line += f" ({_seconds(inter['seconds_left'])})"
        if inter["next_rotation"]:
            line += f"  next rotation {inter['next_rotation'][:19]}Z"
        if inter["failures"]:
            line += f"  [{inter['failures']} failed] {inter['last_error']}"
        print(line)
    if ca.get("leaves_outside_bundle"):
        print(f"  {ca['leaves_outside_bundle']} leaves chain to no root of the bundle")
    for key, label in (("proxies_missing_bundle", "without the new bundle"), ("proxies_on_old_roots", "on old roots")):
        proxies = ca.get(key)
        if proxies:
            print(f"  proxies {label}: {', '.join(proxies)}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _seconds(value: float) -> str:
    return format_duration(timedelta(seconds=value)) if value >= 0 else "expired"


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# -- doctor --------------------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    config = config_of(args)
    print(f"config: ok ({config.source or 'from the environment'})")
    failed = False
    provider: CAProvider | None = None
    try:
        _, provider = _provider(args, config, create=False)
    except MeshIdentityError as err:
        print(f"provider {config.ca.provider}: FAILED: {err}")
        failed = True
    bundle = None
    if provider is not None:
        print(f"provider {provider.name}: loaded")
        try:
            bundle = provider.trust_bundle()
        except MeshIdentityError as err:
            print(f"  FAILED trust bundle: {err}")
            failed = True
        try:
            checks = provider.doctor(config.ca.workload_ttl, config.ca.intermediate_ttl)
        except MeshIdentityError as err:
            print(f"  FAILED checks: {err}")
            failed = True
            checks = []
        for check in checks:
            print(f"  {'ok    ' if check.ok else 'FAILED'} {check.name}: {check.detail}")
            failed = failed or not check.ok
    print("TTL chain:")
    if provider is not None:
        chain = chain_for(config, provider, bundle)
    else:
        chain = TtlChain(
            config.ca.mode, config.ca.workload_ttl, config.ca.intermediate_ttl, config.ca.rotate_after, config.ca.jitter
        )
    report = check_ttl_chain(chain, utcnow())
    for line in report.lines():
        print(f"  {line}")
    failed = failed or not report.ok
    if provider is not None:
        provider.close()
    print("doctor: " + ("problems found" if failed else "all good"))
    return 1 if failed else 0


# -- ca ------------------------------------------------------------------------------------------------------


def cmd_ca_status(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        data = fetch_status(config)
    except ServerError as err:
        print(f"{err}; showing the CA state on disk (leaves and proxies are known to the running server only)")
        _, provider = _provider(args, config, create=False)
        try:
            now = utcnow()
            print(f"root rotation: {provider.root_phase()}")
            for root in provider.trust_bundle().authorities:
                left = format_duration(root.not_valid_after_utc - now)
                print(
                    f"  root  {serial_of(root)}  expires {root.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({left})  "
                    f"sha256 {fingerprint_of(root)}"
                )
        finally:
            provider.close()
        return 0
    _print_ca(data["ca"], _parse_time(data["generated_at"]))
    return 0


def cmd_rotate_root(args: argparse.Namespace) -> int:
    config = config_of(args)
    url = f"{server_url(config)}/admin/root/{args.step}"
    code, body = _request(url, token=_token(config), timeout=STEP_TIMEOUT)
    try:
        reply: dict[str, Any] = json.loads(body)
    except ValueError:
        reply = {"error": body.decode(errors="replace").strip()}
    if code == 200:
        print(reply["message"])
        return 0
    if code == 401:
        raise ServerError(f"the server refused the admin token from {config.state_dir / ADMIN_TOKEN} (401)")
    raise ServerError(reply.get("error") or f"{url} answered {code}")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the authority, rotation engine, metrics/status endpoint and (with a mesh file) the xDS server",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("status", parents=[common], help="every identity, the CA chain and rotation, from the server")
    p.add_argument("--json", action="store_true", help="print the server's /status document")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("doctor", parents=[common], help="check the config, the provider and the TTL chain")
    p.set_defaults(func=cmd_doctor)
    ca = sub.add_parser("ca", help="the CA: status and root rotation")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    p = ca_sub.add_parser("status", parents=[common], help="roots, intermediate, rotation phase and its evidence")
    p.set_defaults(func=cmd_ca_status)
    p = ca_sub.add_parser(
        "rotate-root", parents=[common], help="advance a root rotation (the server refuses a step taken too early)"
    )
    p.add_argument("step", choices=ROOT_STEPS, help="prepare, then activate, then retire")
    p.set_defaults(func=cmd_rotate_root)
