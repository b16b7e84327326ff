"""``ca trust FILE``: the operator's explicit step that adds roots to the provider's own trust store.

A provider that keeps the upstream roots it trusts (cert-manager without a pinned bundle: the root it trusted
on first use) never adds another one by itself; this command does, after checking the file: PEM, every
certificate a self-signed CA valid now. Each root added is audited (a ``CaRotated`` event, kind ``root``,
phase ``trusted``, with its fingerprint; the provider logs it too). Providers without such a store, or with a
pinned bundle, refuse and say why.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509

from mesh_identity.cli.common import build_for
from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage
from mesh_identity.errors import ConfigError
from mesh_identity.events import CaRotated, CertKind
from mesh_identity.provider import root_problem
from mesh_identity.svid import fingerprint_of, load_certs_pem


def read_roots(path: Path) -> tuple[x509.Certificate, ...]:
    """The roots in ``path``; ConfigError naming the file (and the certificate) when one cannot be trusted."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"FILE: cannot read {path}: {err.strerror}") from None
    if not data.strip():
        raise ConfigError(f"FILE: {path} holds no certificates")
    try:
        roots = load_certs_pem(data, f"FILE: {path}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not roots:
        raise ConfigError(f"FILE: {path} holds no certificates")
    now = utcnow()
    for number, cert in enumerate(roots, 1):
        problem = root_problem(cert, now)
        if problem is not None:
            raise ConfigError(
                f"FILE: {path}: certificate {number} of {len(roots)}, {cert.subject.rfc4514_string()!r} (sha256 "
                f"{fingerprint_of(cert)}), {problem}; nothing was trusted"
            )
    return roots


def _line(cert: x509.Certificate) -> str:
    return (
        f"  root {cert.subject.rfc4514_string()!r}  sha256 {fingerprint_of(cert)}  "
        f"expires {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    )


def cmd_ca_trust(args: argparse.Namespace) -> int:
    path = Path(args.file)
    roots = read_roots(path)  # before anything is built: a bad file touches nothing
    with build_for(args, Stage.PROVIDER, create=False) as system:
        provider = system.provider
        added = provider.trust_roots(roots)
        now = utcnow()
        for root in added:
            system.plugins.emit(
                CaRotated(
                    kind=CertKind.ROOT,
                    phase="trusted",
                    old_fingerprint=None,
                    new_fingerprint=fingerprint_of(root),
                    provider=provider.name,
                    at=now,
                )
            )
    if not added:
        print(f"nothing to do: every root in {path} is already trusted (provider {provider.name})")
        for root in roots:
            print(_line(root))
        return 0
    print(f"trusted {len(added)} new root(s) (provider {provider.name}):")
    for root in added:
        print(_line(root))
    print("a running server trusts them from its next certificate request")
    return 0


def add_ca_parsers(
    ca_sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``trust`` on the ``ca`` command's sub-parsers."""
    p = ca_sub.add_parser(
        "trust",
        parents=[common],
        help="trust the roots in FILE (PEM): the explicit step a provider that trusted its first root needs to "
        "trust another",
    )
    p.add_argument("file", metavar="FILE", help="PEM file of self-signed CA certificates")
    p.set_defaults(func=cmd_ca_trust)
