"""``python -m tests.fakes.vault``: a Vault test server in its own process (for benchmarks and manual tries)."""

from __future__ import annotations

import argparse
import json
import sys

from tests.fakes.vault.server import VaultServer


def main() -> None:
    """Serve a Vault test server in this process: a PKI mount ``pki`` with a role ``spiffe`` (any SPIFFE ID, any
    key type, max TTL 24h). Prints ``{"url": ..., "token": ...}`` on one line, then serves until standard input
    closes."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--intermediate", action="store_true", help="a Vault-side intermediate under the root")
    args = parser.parse_args()
    with VaultServer() as server:
        server.add_pki_mount("pki", intermediate=args.intermediate)
        server.add_pki_role(
            "pki", "spiffe", allowed_uri_sans=["spiffe://*"], require_cn=False, key_type="any", max_ttl="24h"
        )
        print(json.dumps({"url": server.url, "token": server.root_token}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
