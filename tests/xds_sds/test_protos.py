"""The committed code of xds_sds/proto is what its .proto files generate (generate.sh), and the Workload API
messages are wire-compatible with the SPIFFE Workload API as the real py-spiffe client defines it."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "xds_sds" / "proto"
GENERATED = sorted(p.name for p in PROTO.glob("*_pb2*.py*"))


def test_generated_code_is_current(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    (copy / "xds_sds").mkdir(parents=True)
    shutil.copytree(PROTO, copy / "xds_sds" / "proto", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    env_python = Path(sys.executable)
    subprocess.run(
        ["bash", str(copy / "xds_sds" / "proto" / "generate.sh")],
        check=True, env={"PYTHON": str(env_python), "PATH": "/usr/bin:/bin"}, capture_output=True,
    )  # fmt: skip
    regenerated = sorted(p.name for p in (copy / "xds_sds" / "proto").glob("*_pb2*.py*"))
    assert regenerated == GENERATED
    stale = [
        name for name in GENERATED if not filecmp.cmp(PROTO / name, copy / "xds_sds" / "proto" / name, shallow=False)
    ]
    assert not stale, f"regenerate with xds_sds/proto/generate.sh: {stale} differ from what the protos generate"


def _fields(message: object) -> list[tuple[str, int, int, bool]]:
    descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return [(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields]


def test_workload_messages_match_the_spiffe_wire_format() -> None:
    from spiffe._proto import workload_pb2 as spiffe_proto  # the dev extra's real client

    from xds_sds.proto import workload_pb2 as ours

    names = [
        "X509SVIDRequest", "X509SVIDResponse", "X509SVID", "X509BundlesRequest", "X509BundlesResponse",
        "JWTSVIDRequest", "JWTSVIDResponse", "JWTSVID", "JWTBundlesRequest", "JWTBundlesResponse",
        "ValidateJWTSVIDRequest", "ValidateJWTSVIDResponse",
    ]  # fmt: skip
    for name in names:
        assert _fields(getattr(ours, name)) == _fields(getattr(spiffe_proto, name)), name
