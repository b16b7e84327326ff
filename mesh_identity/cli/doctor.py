"""``doctor``: the config, the provider's own checks against its live CA, and the TTL chain; no server needed."""

from __future__ import annotations

import argparse

from mesh_identity.cli.common import build_for, config_of
from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage
from mesh_identity.errors import MeshIdentityError
from mesh_identity.provider import CAProvider
from mesh_identity.ttlcheck import TtlChain, chain_for, check_ttl_chain


def cmd_doctor(args: argparse.Namespace) -> int:
    config = config_of(args)
    print(f"config: ok ({config.source or 'from the environment'})")
    failed = False
    provider: CAProvider | None = None
    try:
        provider = build_for(args, Stage.PROVIDER, create=False, config=config).provider
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="check the config, the provider and the TTL chain")
    p.set_defaults(func=cmd_doctor)
