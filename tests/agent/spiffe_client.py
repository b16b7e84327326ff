"""A workload that uses the real py-spiffe client (PyPI ``spiffe``, not our code) against the agent's Workload API.

Run as ``python spiffe_client.py COMMAND ...`` with ``SPIFFE_ENDPOINT_SOCKET`` set (the tests start it as other
uids with ``setpriv``); it prints one JSON document per line and exits 3 on a py-spiffe error, printing
``{"error": <class>, "message": <text>}``.

=====================================  =====================================================================
``x509``                               ``fetch_x509_svids()``: every SVID (SPIFFE ID, serial, chain length,
                                       NotAfter, key type) parsed by py-spiffe's ``X509Svid``
``bundles``                            ``fetch_x509_bundles()``: trust domain -> root fingerprints
``jwt AUDIENCE [SPIFFE_ID]``           ``fetch_jwt_svid(audience={AUDIENCE})``
``validate TOKEN AUDIENCE``            ``validate_jwt_svid(TOKEN, AUDIENCE)``
``jwt-bundles``                        ``fetch_jwt_bundles()``: trust domain -> key ids
``source COUNT TIMEOUT``               an ``X509Source`` kept open: a line per SVID it sees, until COUNT serials
``streams COUNT``                      COUNT ``stream_x509_contexts`` watchers held open until stdin closes
=====================================  =====================================================================
"""

from __future__ import annotations

import json
import sys
import threading
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import SpiffeId, WorkloadApiClient, X509Source


def _svid(svid) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "chain": len(svid.cert_chain),
        "not_after": svid.leaf.not_valid_after_utc.isoformat(),
        "key": svid.private_key.curve.name if isinstance(svid.private_key, ec.EllipticCurvePrivateKey) else "other",
    }


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "source":
        return _source(int(argv[1]), float(argv[2]))
    with WorkloadApiClient(default_timeout=20) as client:
        if command == "x509":
            out: object = [_svid(s) for s in client.fetch_x509_svids()]
        elif command == "bundles":
            out = {
                str(b.trust_domain): sorted(c.fingerprint(hashes.SHA256()).hex() for c in b.x509_authorities)
                for b in client.fetch_x509_bundles().bundles
            }
        elif command == "jwt":
            subject = SpiffeId(argv[2]) if len(argv) > 2 else None
            jwt = client.fetch_jwt_svid(audience={argv[1]}, subject=subject)
            out = {"spiffe_id": str(jwt.spiffe_id), "audience": sorted(jwt.audience), "token": jwt.token}
        elif command == "validate":
            jwt = client.validate_jwt_svid(argv[1], argv[2])
            out = {"spiffe_id": str(jwt.spiffe_id), "audience": sorted(jwt.audience)}
        elif command == "jwt-bundles":
            out = {str(b.trust_domain): sorted(b.jwt_authorities) for b in client.fetch_jwt_bundles().bundles}
        elif command == "streams":
            return _streams(client, int(argv[1]))
        else:
            raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out), flush=True)
    return 0


def _source(count: int, timeout: float) -> int:
    """Keep an X509Source open and report every SVID it holds, until ``count`` different serials were seen."""
    seen: list[str] = []
    changed = threading.Event()
    with X509Source(timeout_in_seconds=30) as source:
        source.subscribe_for_updates(changed.set)
        deadline = time.monotonic() + timeout
        while len(seen) < count:
            svid = source.svid
            serial = format(svid.leaf.serial_number, "x")
            if serial not in seen:
                seen.append(serial)
                print(json.dumps({"source": _svid(svid), "seen": len(seen)}), flush=True)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                print(json.dumps({"error": "Timeout", "message": f"saw {len(seen)} serials"}), flush=True)
                return 4
            changed.wait(min(left, 1.0))
            changed.clear()
    return 0


def _streams(client: WorkloadApiClient, count: int) -> int:
    """Hold ``count`` X.509 streams open (each told of every update) until stdin closes."""
    updates = [0] * count
    handlers = []
    for index in range(count):

        def on_success(context: object, index: int = index) -> None:
            updates[index] += 1

        handlers.append(client.stream_x509_contexts(on_success, lambda err: None))
    print(json.dumps({"streams": count}), flush=True)
    sys.stdin.read()
    for handler in handlers:
        handler.cancel()
    print(json.dumps({"updates": updates}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as err:  # py-spiffe's errors: report them for the test to assert on
        print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)
        sys.exit(3)
