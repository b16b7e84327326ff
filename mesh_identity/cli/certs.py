"""``init``, ``issue``, ``inspect`` and ``providers``."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from mesh_identity.cli.common import build_for
from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage, provider_specs
from mesh_identity.durations import format_duration, parse_duration
from mesh_identity.errors import ConfigError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.keys import KeyType, key_type_of
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, fingerprint_of, load_certs_pem, serial_of, spiffe_id_of
from mesh_identity.verify import chain_problem


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
    p = sub.add_parser("inspect", help="show an SVID and check its chain against a bundle")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--bundle", metavar="FILE", help="trust bundle (default: bundle.pem next to FILE)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("providers", help="list installed CA providers, their modes and options")
    p.set_defaults(func=cmd_providers)

