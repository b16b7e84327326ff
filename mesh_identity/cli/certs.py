"""``init``, ``issue``, ``inspect`` and ``providers``."""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from mesh_identity.cli.common import build_for
from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage, provider_specs
from mesh_identity.durations import format_duration, parse_duration
from mesh_identity.errors import ConfigError, MeshIdentityError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.keys import KeyType, key_type_of
from mesh_identity.profile import is_ca
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, fingerprint_of, load_certs_pem, serial_of, spiffe_id_of, spiffe_ids_of
from mesh_identity.verify import chain_problem
from xds_sds.mesh.handshake import os_reason, tls_reason


def cmd_init(args: argparse.Namespace) -> int:
    with build_for(args, Stage.PROVIDER, create=True) as system:
        provider = system.provider
        bundle = provider.trust_bundle()
        verb = "created" if provider.created else "using existing" if provider.created is False else "using"
        print(f"{verb} CA state in {system.config.state_dir} (provider {provider.name})")
        for root in bundle.authorities:
            print(f"  root {serial_of(root)}  expires {root.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    spiffe_id = SpiffeId.parse(args.spiffe_id)
    ttl = _duration(args.ttl, "--ttl") if args.ttl else None
    key_type = _key_type(args.key_type) if args.key_type else None
    csr = _read(args.csr, "--csr") if args.csr else None
    with build_for(args, Stage.AUTHORITY, create=False) as system:
        assert system.authority is not None  # built at Stage.AUTHORITY
        svid = system.authority.issue(spiffe_id, csr=csr, ttl=ttl, key_type=key_type, requested_by="cli")
    out = ensure_private_dir(Path(args.out))
    # Everything is issued in memory first; the files are then each replaced atomically.
    if svid.private_key is not None:
        write_private(out / "key.pem", svid.key_pem())
    write_private(out / "svid.pem", svid.cert_chain_pem(), mode=0o644)
    write_private(out / "bundle.pem", svid.bundle.pem(), mode=0o644)
    left = svid.not_after - utcnow()
    expires = f"{svid.not_after:%Y-%m-%dT%H:%M:%SZ}"
    print(f"issued {svid.spiffe_id} serial {svid.serial}, expires {expires} (in {format_duration(left)})")
    written = ["svid.pem", *(["key.pem"] if svid.private_key else []), "bundle.pem"]
    print(f"  wrote {', '.join(str(out / name) for name in written)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.connect:
        if args.file:
            raise ConfigError("inspect: give FILE or --connect HOST:PORT, not both")
        return _inspect_endpoint(args)
    if not args.file:
        raise ConfigError("inspect: give FILE (an SVID's PEM) or --connect HOST:PORT")
    if args.cert or args.key or args.server_name:
        raise ConfigError("--cert, --key and --server-name go with --connect")
    path = Path(args.file)
    certs = load_certs_pem(_read(str(path), "FILE"), str(path))
    if not certs:
        raise ConfigError(f"FILE: {path} holds no certificates")
    leaf, chain = certs[0], certs[1:]
    bundle_path = Path(args.bundle) if args.bundle else path.with_name("bundle.pem")
    now = utcnow()
    try:
        spiffe = str(spiffe_id_of(leaf))
    except ValueError as err:
        spiffe = f"none ({err})"
    kt = key_type_of(leaf.public_key())  # type: ignore[arg-type]
    print(f"SPIFFE ID:   {spiffe}")
    print(f"serial:      {serial_of(leaf)}")
    print(f"sha256:      {fingerprint_of(leaf)}")
    print(f"key:         {kt.value if kt else type(leaf.public_key()).__name__}")
    print(f"issuer:      {leaf.issuer.rfc4514_string()}")
    print(f"not before:  {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
    left = leaf.not_valid_after_utc - now
    state = "expired" if left < timedelta(0) else f"{format_duration(left)} left"
    print(f"not after:   {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({state})")
    print(f"chain:       {len(chain)} intermediate(s)")
    if not bundle_path.exists():
        print(f"verify:      skipped, no bundle at {bundle_path} (use --bundle)")
        return 0
    roots = load_certs_pem(bundle_path.read_bytes(), str(bundle_path))
    td = spiffe_id_of(leaf).trust_domain if spiffe.startswith("spiffe://") else None
    if td is None or not roots:
        print("verify:      FAILED (no SPIFFE ID or empty bundle)")
        return 1
    problem = chain_problem(leaf, chain, TrustBundle(td, roots), now)
    print(f"verify:      {'OK against ' + str(bundle_path) if problem is None else 'FAILED: ' + problem}")
    return 0 if problem is None else 1


class EndpointError(MeshIdentityError):
    """``inspect --connect``: the endpoint cannot be reached, or the TLS handshake with it failed."""


CONNECT_TIMEOUT = 10.0


def _inspect_endpoint(args: argparse.Namespace) -> int:
    """``inspect --connect``: the chain the endpoint presents (all of it, as sent), each certificate shown, the
    chain verified against the bundle (``--bundle``, default ``bundle.pem`` beside ``--cert``)."""
    host, port = _host_port(args.connect)
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert and --key go together")
    if args.bundle:
        bundle_path: Path | None = Path(args.bundle)
    else:
        bundle_path = Path(args.cert).with_name("bundle.pem") if args.cert else None
    roots = None
    if bundle_path is not None and (args.bundle or bundle_path.exists()):
        roots = load_certs_pem(_read(str(bundle_path), "--bundle"), str(bundle_path))
    for value, flag in ((args.cert, "--cert"), (args.key, "--key")):
        if value:
            _read(value, flag)  # a missing file is a usage error, before any connection
    chain, version = presented_chain(
        host, port, cert=args.cert, key=args.key, server_name=args.server_name, timeout=CONNECT_TIMEOUT
    )
    if not chain:
        raise EndpointError(f"{host}:{port} presented no certificate")
    now = utcnow()
    named = f", server name {args.server_name}" if args.server_name else ""
    print(f"endpoint:    {host}:{port} ({version}{named})")
    print(f"presented:   {len(chain)} certificate(s)")
    for number, cert in enumerate(chain, 1):
        print(f"certificate {number} of {len(chain)}{' (leaf)' if number == 1 else ''}:")
        _show_presented(cert, now)
    if roots is None:
        print("verify:      skipped, no bundle (use --bundle, or --cert with a bundle.pem beside it)")
        return 0
    leaf, above = chain[0], tuple(chain[1:])
    try:
        trust_domain = spiffe_id_of(leaf).trust_domain
    except ValueError as err:
        print(f"verify:      FAILED: the leaf has no SPIFFE ID ({err})")
        return 1
    if not roots:
        print(f"verify:      FAILED: {bundle_path} holds no certificates")
        return 1
    problem = chain_problem(leaf, above, TrustBundle(trust_domain, roots), now)
    print(f"verify:      {'OK against ' + str(bundle_path) if problem is None else 'FAILED: ' + problem}")
    return 0 if problem is None else 1


def _show_presented(cert: x509.Certificate, now: datetime) -> None:
    if is_ca(cert):
        ids = spiffe_ids_of(cert)
        spiffe = f"{', '.join(str(i) for i in ids) or 'none'} (CA)"
    else:
        try:
            spiffe = str(spiffe_id_of(cert))
        except ValueError as err:
            spiffe = f"none ({err})"
    left = cert.not_valid_after_utc - now
    state = "expired" if left < timedelta(0) else f"{format_duration(left)} left"
    print(f"  subject:     {cert.subject.rfc4514_string()}")
    print(f"  SPIFFE ID:   {spiffe}")
    print(f"  serial:      {serial_of(cert)}")
    print(f"  issuer:      {cert.issuer.rfc4514_string()}")
    print(f"  not before:  {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}")
    print(f"  not after:   {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({state})")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--connect: {text!r} is not HOST:PORT")
    return host, int(port)


def presented_chain(
    host: str,
    port: int,
    *,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[list[x509.Certificate], str]:
    """Connect over TLS and return every certificate the endpoint presented (leaf first, as sent) and the TLS
    version. pyOpenSSL, because it gives the whole presented chain (``get_peer_cert_chain``); the standard
    library gives the leaf only. Nothing is verified here (the peer is a SPIFFE identity, not a web host
    name): the caller checks the chain against the SPIFFE bundle."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_NONE)
    if cert and key:
        try:
            context.use_certificate_chain_file(cert)
            context.use_privatekey_file(key)
            context.check_privatekey()
        except SSL.Error as err:
            raise ConfigError(f"--cert/--key: cannot use {cert} with {key}: {tls_reason(err)}") from None
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise EndpointError(f"cannot connect to {where}: {os_reason(err)}") from None
    with sock:
        conn = SSL.Connection(context, sock)
        if server_name:
            conn.set_tlsext_host_name(server_name.encode("idna"))
        conn.set_connect_state()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except (SSL.WantReadError, SSL.WantWriteError) as want:
                remaining = deadline - time.monotonic()
                reading = isinstance(want, SSL.WantReadError)
                ready = select.select([sock] if reading else [], [] if reading else [sock], [], max(remaining, 0))
                if remaining <= 0 or not any(ready):
                    raise EndpointError(f"TLS handshake with {where} failed: timed out after {timeout:g}s") from None
            except SSL.Error as err:
                raise EndpointError(f"TLS handshake with {where} failed: {tls_reason(err)}") from None
            except OSError as err:
                raise EndpointError(f"TLS handshake with {where} failed: {os_reason(err)}") from None
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        version = conn.get_protocol_version_name()
        with contextlib.suppress(SSL.Error, OSError):
            conn.shutdown()
    return list(chain), version


def cmd_providers(args: argparse.Namespace) -> int:
    for spec in provider_specs(debug=bool(args.debug)):
        caps = spec.capabilities
        print(f"{spec.name}: {spec.description}")
        print(f"  modes: {', '.join(sorted(caps.modes))}; key types: {', '.join(sorted(caps.key_types))}")
        for option in spec.options:
            flags = " (required)" if option.required else ""
            default = "" if option.default is None or option.secret else f" [default: {_show(option.default)}]"
            print(f"  {option.name} ({option.type.value}){flags}{default}: {option.help}")
    return 0


def _show(value: object) -> str:
    return format_duration(value) if isinstance(value, timedelta) else str(value)


def _duration(text: str, flag: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None


def _key_type(text: str) -> KeyType:
    try:
        return KeyType.parse(text)
    except ValueError as err:
        raise ConfigError(f"--key-type: {err}") from None


def _read(path: str, flag: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag}: cannot read {path}: {err.strerror}") from None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="create the CA state (built-in root) if it does not exist")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("issue", parents=[common], help="issue an X.509-SVID into a directory")
    p.add_argument("spiffe_id", metavar="SPIFFE_ID")
    p.add_argument("--out", required=True, metavar="DIR", help="writes svid.pem (leaf+chain), key.pem, bundle.pem")
    p.add_argument("--csr", metavar="FILE", help="sign this CSR (PEM or DER, '-' for stdin) instead of making a key")
    p.add_argument("--ttl", metavar="DURATION", help="lifetime, e.g. 1h (default: ca.workload_ttl)")
    p.add_argument("--key-type", metavar="TYPE", help="ecdsa-p256 (default), ecdsa-p384, rsa-2048, rsa-3072")
    p.set_defaults(func=cmd_issue)
    p = sub.add_parser(
        "inspect", help="show an SVID (a file, or the chain a live TLS endpoint presents) and check it against a bundle"
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="an SVID's PEM: the leaf, then its chain")
    p.add_argument(
        "--connect", metavar="HOST:PORT", help="instead of FILE: connect over TLS and inspect the chain presented"
    )
    p.add_argument("--cert", metavar="FILE", help="with --connect: a client certificate chain (PEM) to present")
    p.add_argument("--key", metavar="FILE", help="with --connect: the key of --cert")
    p.add_argument("--server-name", metavar="NAME", help="with --connect: the TLS server name (SNI) to send")
    p.add_argument(
        "--bundle", metavar="FILE", help="trust bundle (default: bundle.pem next to FILE, or next to --cert)"
    )
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("providers", help="list installed CA providers, their modes and options")
    p.set_defaults(func=cmd_providers)
