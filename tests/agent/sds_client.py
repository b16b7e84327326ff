"""An SDS client (``StreamSecrets``, as Envoy speaks it) for the agent's ``sds`` socket, run as any uid.

``python sds_client.py SOCKET NAME...``: asks for the secrets ``NAME...`` on a new stream and prints one JSON
line: ``{"names": [...], "version": ...}`` for the first response, or ``{"code": ..., "details": ...}`` when the
stream ends with an error status.
"""

from __future__ import annotations

import json
import queue
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def main(socket_path: str, names: list[str]) -> int:
    requests: queue.SimpleQueue[discovery_pb2.DiscoveryRequest | None] = queue.SimpleQueue()
    requests.put(
        discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="envoy-1"), type_url=SECRET, resource_names=names)
    )

    def feed():  # type: ignore[no-untyped-def]
        while (item := requests.get()) is not None:
            yield item

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stream = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(feed(), timeout=30)
        try:
            response = next(iter(stream))
        except grpc.RpcError as err:
            print(json.dumps({"code": err.code().name, "details": err.details()}), flush=True)
            return 0
        finally:
            requests.put(None)
        secrets = [secret_pb2.Secret.FromString(r.value) for r in response.resources]
        print(json.dumps({"names": sorted(s.name for s in secrets), "version": response.version_info}), flush=True)
        stream.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
