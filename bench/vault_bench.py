"""Vault provider throughput, against references measured in the same run.

Run:  .venv/bin/python bench/vault_bench.py [--n 2000] [--rounds 3] [--signs 400] [--threads 8]

1. Intermediate mode: ``Authority.issue`` (generated key) with the Vault provider against the same with the
   built-in provider, interleaved round by round in this process; the figure is the ratio of the best rounds
   (goal: Vault >= 0.9 x built-in). Vault signs the intermediate once; workloads are signed here.
2. Per-workload mode: ``VaultProvider.sign_workload`` from ``--threads`` client threads against the Vault test
   server (its own process, HTTP on loopback), and ``cfssl serve`` (Debian ``golang-cfssl``) signing the very
   same CSRs over HTTP from as many threads, as a peer reference. Rounds are interleaved; best of each.

Both servers run on this machine, so the client competes with them for the cores: compare the two figures of
one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_identity.authority import Authority, AuthoritySettings, workload_csr
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.builtin.provider import SPEC as BUILTIN
from providers.vault.provider import SPEC as VAULT
from providers.vault.provider import VaultProvider

ROOT = Path(__file__).resolve().parent.parent
TD = TrustDomain("example.org")
ID = SpiffeId.for_kubernetes(TD, "default", "bench")
PEM = serialization.Encoding.PEM


class TestServer:
    """The Vault test server in its own process (so it does not share this process's GIL)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.vault"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        info = json.loads(self.process.stdout.readline())
        self.url, self.token = info["url"], info["token"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


def vault_provider(server: TestServer, state: Path, mode: Mode) -> VaultProvider:
    token_file = state / "vault-token"
    token_file.write_text(server.token)
    options = VAULT.validate_options({"address": server.url, "token_file": str(token_file), "pki_role": "spiffe"})
    return VaultProvider(ProviderContext(TD, state, KeyType.ECDSA_P256, mode, utcnow), options)


def authority(provider: object) -> Authority:
    made = Authority(provider, AuthoritySettings(TD, mode=Mode.INTERMEDIATE))  # type: ignore[arg-type]
    made.start()
    return made


def rate(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def intermediate_mode(server: TestServer, tmp: Path, n: int, rounds: int) -> None:
    (tmp / "builtin").mkdir()
    (tmp / "vault").mkdir()
    builtin = authority(
        BUILTIN.factory(
            ProviderContext(TD, tmp / "builtin", KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow),
            BUILTIN.validate_options({}),
        )
    )
    provider = vault_provider(server, tmp / "vault", Mode.INTERMEDIATE)
    vault = authority(provider)

    def issue(which: Authority) -> Callable[[], object]:
        def once() -> object:
            svid = which.issue(ID)
            return svid.cert_chain_pem() + svid.key_pem()

        return once

    best_builtin = best_vault = 0.0
    for _ in range(rounds):
        best_builtin = max(best_builtin, rate(issue(builtin), n))
        best_vault = max(best_vault, rate(issue(vault), n))
    provider.close()
    print(
        f"intermediate mode, Authority.issue   built-in {best_builtin:7.0f}/s   vault {best_vault:7.0f}/s   "
        f"ratio {best_vault / best_builtin:.2f} (goal >= 0.9; best of {rounds} x {n})"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cfssl:
    """``cfssl serve`` with an ECDSA P-256 root of its own."""

    def __init__(self, directory: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfssl bench root")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        (directory / "ca.pem").write_bytes(cert.public_bytes(PEM))
        (directory / "ca-key.pem").write_bytes(
            key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
        )
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                "cfssl",
                "serve",
                "-address",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-ca",
                str(directory / "ca.pem"),
                "-ca-key",
                str(directory / "ca-key.pem"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}/api/v1/cfssl/sign"
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("cfssl serve did not start") from None
                time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def threaded_rate(sign: Callable[[bytes], object], csrs: list[bytes], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(sign, csrs))
        return len(csrs) / (time.perf_counter() - start)


def per_workload_mode(server: TestServer, tmp: Path, signs: int, rounds: int, threads: int) -> None:
    (tmp / "pw").mkdir()
    provider = vault_provider(server, tmp / "pw", Mode.PER_WORKLOAD)
    csrs = [workload_csr(generate_key(KeyType.ECDSA_P256), ID).public_bytes(PEM) for _ in range(signs)]
    ttl = timedelta(hours=1)

    def vault_sign(pem: bytes) -> object:
        return provider.sign_workload(x509.load_pem_x509_csr(pem), ID, ttl).certificate

    cfssl = Cfssl(tmp) if shutil.which("cfssl") else None
    local = threading.local()

    def cfssl_sign(pem: bytes) -> object:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        answer = session.post(cfssl.url, json={"certificate_request": pem.decode()}, timeout=30)  # type: ignore[union-attr]
        answer.raise_for_status()
        result = answer.json()
        assert result["success"], result
        return result["result"]["certificate"]

    best_vault = best_cfssl = 0.0
    try:
        for _ in range(rounds):
            best_vault = max(best_vault, threaded_rate(vault_sign, csrs, threads))
            if cfssl is not None:
                best_cfssl = max(best_cfssl, threaded_rate(cfssl_sign, csrs, threads))
    finally:
        provider.close()
        if cfssl is not None:
            cfssl.close()
    peer = (
        f"cfssl serve {best_cfssl:7.0f}/s   vault/cfssl {best_vault / best_cfssl:.2f}"
        if cfssl
        else "cfssl not installed (apt-get install golang-cfssl)"
    )
    print(
        f"per-workload mode, {threads} threads     vault test server {best_vault:7.0f}/s   {peer} "
        f"(best of {rounds} x {signs})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="issuances per round and side (intermediate mode)")
    parser.add_argument("--signs", type=int, default=400, help="CSRs signed per round and side (per-workload)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    server = TestServer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            intermediate_mode(server, Path(tmp), args.n, args.rounds)
            per_workload_mode(server, Path(tmp), args.signs, args.rounds, args.threads)
    finally:
        server.close()


if __name__ == "__main__":
    main()
