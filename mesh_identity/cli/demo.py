"""``mesh-identity demo``: the embedded default at work, with nothing else installed.

Until the xDS/Envoy mesh lands, the demo initialises a built-in CA in a state directory, issues SVIDs for two
workloads, and runs real mTLS handshakes between them, printing each side's view of its peer.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.durations import format_duration
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid, spiffe_id_of
from plugins.manager import Plugins


def _context(svid: X509Svid, directory: Path, server: bool) -> ssl.SSLContext:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "svid.pem").write_bytes(svid.cert_chain_pem())
    (directory / "key.pem").write_bytes(svid.key_pem())
    (directory / "key.pem").chmod(0o600)
    (directory / "bundle.pem").write_bytes(svid.bundle.pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(directory / "svid.pem", directory / "key.pem")
    ctx.load_verify_locations(directory / "bundle.pem")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _peer(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    return str(spiffe_id_of(x509.load_der_x509_certificate(der))) if der else "none"


def cmd_demo(args: argparse.Namespace) -> int:
    state = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="mesh-identity-demo-"))
    td = TrustDomain("demo.mesh")
    plugins = Plugins.load()
    spec = plugins.provider("builtin")
    context = ProviderContext(td, state, KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow)
    provider = spec.factory(context, spec.validate_options({}))
    authority = Authority(provider, AuthoritySettings(td), events=plugins)
    authority.start()
    print(f"built-in CA in {state}; trust domain {td}")
    ids = [SpiffeId.for_kubernetes(td, "shop", name) for name in ("frontend", "payments")]
    for round_ in range(args.rounds):
        client_svid, server_svid = (authority.issue(i, requested_by="demo") for i in ids)
        for svid in (client_svid, server_svid):
            left = format_duration(svid.not_after - utcnow())
            print(f"  round {round_ + 1}: {svid.spiffe_id} serial {svid.serial} expires in {left}")
        listener = socket.create_server(("127.0.0.1", 0))
        seen: dict[str, str] = {}

        def serve(
            listener: socket.socket = listener, svid: X509Svid = server_svid, seen: dict[str, str] = seen
        ) -> None:
            conn, _ = listener.accept()
            with _context(svid, state / "payments", server=True).wrap_socket(conn, server_side=True) as tls:
                seen["server saw"] = _peer(tls)
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = _context(client_svid, state / "frontend", server=False)
        with socket.create_connection(listener.getsockname()) as raw, client_ctx.wrap_socket(raw) as tls:
            seen["client saw"] = _peer(tls)
            tls.recv(2)
        thread.join(5)
        listener.close()
        print(f"  mTLS handshake: client saw {seen['client saw']}, server saw {seen['server saw']}")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="run the demo on the embedded default (built-in CA)")
    p.add_argument("--state-dir", metavar="DIR", help="CA state directory (default: a new temporary directory)")
    p.add_argument("--rounds", type=int, default=3, help="issue-and-handshake rounds")
    p.set_defaults(func=cmd_demo)
