"""Run as a separate process by test_xds_many_streams.py: open N ADS streams at once on one connection.

Prints one JSON line: how many streams got their first response and the errors of the others.
(A separate process, because one grpc.aio client per process is what the library supports well.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


async def main(target: str, certdir: Path, streams: int) -> None:
    creds = grpc.ssl_channel_credentials(
        (certdir / "ca.pem").read_bytes(), (certdir / "key.pem").read_bytes(), (certdir / "chain.pem").read_bytes()
    )
    async with grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        errors: list[str] = []

        async def one() -> bool:
            call = stub.StreamAggregatedResources()
            try:
                await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="node-a"), type_url=CLUSTER))
                response = await call.read()
                return bool(response.resources)
            except grpc.aio.AioRpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")
                return False
            finally:
                call.cancel()

        results = await asyncio.gather(*(one() for _ in range(streams)))
    print(json.dumps({"answered": sum(results), "errors": sorted(set(errors))}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
