"""One real Envoy pair (``frontend`` -> ``backend``) on an external CA provider, for the provider e2e tests.

A test module starts one pair and its cases take turns: :meth:`ProviderPair.switch` makes another
:class:`Authority` (a provider in a mode) the issuer and rotates both sidecars onto SVIDs from it. Sharing is
safe because every authority of a module answers with the same trust bundle (checked on every switch), so the
validation context and the sidecars' xDS client certificates stay valid whichever case runs first.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_identity.authority import Authority
from mesh_identity.spiffe import TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid, cert_pem, certs_pem
from tests.e2e.conftest import AuthorityIssuer
from tests.e2e.harness import RequestLoop, RunningMesh, loopback_mesh, start_mesh, xfcc_hash
from tests.waiting import wait_until

SERVICES = ("frontend", "backend")
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", re.DOTALL)


@dataclass
class ProviderPair:
    running: RunningMesh
    issuer: AuthorityIssuer
    bundle: TrustBundle  # what the xDS server gave the sidecars to validate peers with
    workdir: Path

    def switch(self, authority: Authority) -> dict[str, X509Svid]:
        """Issue from ``authority`` from now on; new SVIDs for both sidecars, returned once both serve them."""
        assert authority.bundle() == self.bundle, "every authority of a module must answer with the same bundle"
        self.issuer.authority = authority
        svids = {service: self.running.rotate(service) for service in SERVICES}
        for service, svid in svids.items():
            self.running.wait_serving(service, svid)
        return svids

    def check_mtls(self, svids: dict[str, X509Svid], name: str) -> tuple[x509.Certificate, ...]:
        """Traffic between the sidecars on ``svids``, what Envoy's admin shows, and openssl's verdict.

        Returns the chain that backend's sidecar presents, as ``openssl s_client`` received it.
        """
        frontend, backend = svids["frontend"], svids["backend"]
        answer = wait_until(  # pooled upstream connections live a second: wait for one on the new certificate
            lambda: self._answer_over(xfcc_hash(frontend)), "a request over frontend's new certificate"
        )
        assert (answer["service"], answer["peer"]) == ("backend", str(frontend.spiffe_id))
        roots = {cert.serial_number for cert in self.bundle.authorities}
        for service, svid in svids.items():
            envoy = self.running.sidecar(service)
            assert svid.leaf.serial_number in envoy.cert_serials(svid.spiffe_id)
            assert envoy.ca_serials() == roots
        served, reply = openssl_s_client(self.running, frontend, self.bundle, self.workdir / name)
        assert served == (backend.leaf, *backend.chain)
        assert f'"peer": "{frontend.spiffe_id}"' in reply  # Envoy accepted openssl's client certificate too
        return served

    def _answer_over(self, client_hash: str) -> dict[str, Any] | None:
        status, answer = self.running.request("frontend", "backend")
        assert status == 200, answer
        found: dict[str, Any] = answer
        return found if f"Hash={client_hash};" in found.get("xfcc", "") else None

    def rotate_under_traffic(self, authorities: Sequence[Authority]) -> RequestLoop:
        """Requests in a loop while each authority in turn pushes new SVIDs to both sidecars."""
        pids = {name: envoy.pid for name, envoy in self.running.sidecars.items()}
        with RequestLoop(self.running) as loop:
            loop.wait_for(10)
            for authority in authorities:
                svids = self.switch(authority)
                loop.wait_for_hash(xfcc_hash(svids["frontend"]))
                loop.wait_for(10)
        assert {name: envoy.pid for name, envoy in self.running.sidecars.items()} == pids  # pushed, not restarted
        return loop


@contextlib.contextmanager
def provider_pair(first: Authority, trust_domain: TrustDomain, workdir: Path) -> Iterator[ProviderPair]:
    """The xDS server and a frontend/backend pair of apps and sidecars, started on SVIDs from ``first``."""
    issuer = AuthorityIssuer(first)
    mesh = loopback_mesh(trust_domain, {"frontend": ["backend"], "backend": []})
    with start_mesh(issuer, mesh, workdir / "mesh") as running:
        yield ProviderPair(running, issuer, first.bundle(), workdir)


def openssl_s_client(
    running: RunningMesh, client: X509Svid, bundle: TrustBundle, directory: Path
) -> tuple[tuple[x509.Certificate, ...], str]:
    """``GET /`` with the openssl CLI to backend's inbound port, presenting ``client`` and verifying the sidecar's
    chain against ``bundle`` strictly (a verification error aborts the handshake). Returns the chain received
    and the reply."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"bundle": bundle.pem(), "cert": cert_pem(client.leaf), "chain": certs_pem(client.chain)}
    files["key"] = client.key_pem()
    for name, data in files.items():
        (directory / f"{name}.pem").write_bytes(data)
    (directory / "key.pem").chmod(0o600)
    inbound = running.inbound("backend")
    command = ["openssl", "s_client", "-connect", f"{inbound.host}:{inbound.port}", "-showcerts", "-ign_eof"]
    command += ["-verify_return_error", "-x509_strict", "-CAfile", str(directory / "bundle.pem")]
    command += ["-cert", str(directory / "cert.pem"), "-key", str(directory / "key.pem")]
    if client.chain:
        command += ["-cert_chain", str(directory / "chain.pem")]
    request = b"GET / HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n"
    result = subprocess.run(command, input=request, capture_output=True, timeout=60, check=False)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in output, output
    chain = tuple(x509.load_pem_x509_certificate(pem) for pem in _PEM.findall(result.stdout))
    return chain, output
