"""Small Envoy building blocks shared by the resource builders: Any packing, addresses, config sources."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, config_source_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh_identity.mesh.model import Address


def pack(message: Message) -> any_pb2.Any:
    """``message`` in an ``Any``, serialised deterministically (so equal config hashes equal)."""
    body = any_pb2.Any()
    body.Pack(message, deterministic=True)
    return body


def socket_address(address: Address) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address.host, port_value=address.port))


def ads() -> config_source_pb2.ConfigSource:
    """Fetch over the aggregated stream the proxy already has with us."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.ApiVersion.V3
    )
