"""Looking for private keys in what the xDS server sends: agent mode's promise, checked on the wire.

:func:`private_keys_in` decodes a message all the way down (every ``google.protobuf.Any`` is unpacked, however
deep: a listener's filters and transport sockets, a secret in a discovery response) and names each place that
holds a private key or a way to one:

* a field named ``private_key``, ``private_key_provider`` or ``pkcs12`` that is set (Envoy's ``TlsCertificate``,
  whether inline, a file name or a provider);
* any ``bytes`` or ``string`` field holding a PEM private key block (``-----BEGIN ... PRIVATE KEY-----``), or
  ``bytes`` that parse as a DER private key (encrypted ones too);
* an ``Any`` whose type this process cannot decode (it could hide one: not checked is not clean).

:class:`KeyWatch` is a tap for :meth:`~xds_sds.protocol.server.DiscoveryServer.add_tap` that counts the
responses and what they held; the demo shows its figures, and the agent-mode tests assert on them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from google.protobuf import any_pb2, descriptor, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

KEY_FIELDS = frozenset({"private_key", "private_key_provider", "pkcs12"})
_PEM_KEY = b"PRIVATE KEY-----"
_ANY = any_pb2.Any.DESCRIPTOR.full_name
_MAX_DEPTH = 64
_TEXT = (descriptor.FieldDescriptor.TYPE_BYTES, descriptor.FieldDescriptor.TYPE_STRING)


def private_keys_in(message: Message) -> list[str]:
    """The field paths in ``message`` where a private key is (see the module docstring); empty when none."""
    found: list[str] = []
    _walk(message, message.DESCRIPTOR.name, found, 0)
    return found


def _walk(message: Message, path: str, found: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        found.append(f"{path}: nested deeper than {_MAX_DEPTH} levels (not checked)")
        return
    if message.DESCRIPTOR.full_name == _ANY:
        _walk_any(message, path, found, depth)
        return
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        if field.name in KEY_FIELDS:
            found.append(where)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            for key, item in value.items():
                _check(key_field, key, f"{where}[{key!r}]", found, depth)
                _check(value_field, item, f"{where}[{key!r}]", found, depth)
        elif field.is_repeated:
            for index, item in enumerate(value):
                _check(field, item, f"{where}[{index}]", found, depth)
        else:
            _check(field, value, where, found, depth)


def _check(field: descriptor.FieldDescriptor, value: object, at: str, found: list[str], depth: int) -> None:
    if isinstance(value, Message):
        _walk(value, at, found, depth + 1)
    elif field.type in _TEXT and _holds_key(value if isinstance(value, bytes) else str(value).encode()):
        found.append(at)


def _walk_any(body: Message, path: str, found: list[str], depth: int) -> None:
    assert isinstance(body, any_pb2.Any)
    name = body.TypeName()
    try:
        inner = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))()
        if not body.Unpack(inner):
            raise DecodeError(name)
    except (KeyError, DecodeError):
        found.append(f"{path}: an Any of type {name!r} that cannot be decoded here (not checked)")
        return
    _walk(inner, f"{path}<{inner.DESCRIPTOR.name}>", found, depth + 1)


def _holds_key(data: bytes) -> bool:
    if _PEM_KEY in data:
        return True
    if not data or data[0] != 0x30:  # a DER key is a SEQUENCE
        return False
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # encrypted: a key all the same
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True, slots=True)
class KeyFigures:
    """What a :class:`KeyWatch` has seen: responses, those with a private key, and the first place found."""

    responses: int
    with_keys: int
    first: str | None


class KeyWatch:
    """A response tap (``tap(service, response)``) counting responses and the private keys in them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._responses = 0
        self._with_keys = 0
        self._first: str | None = None

    def __call__(self, service: str, response: Message) -> None:
        found = private_keys_in(response)
        with self._lock:
            self._responses += 1
            if found:
                self._with_keys += 1
                if self._first is None:
                    self._first = f"{service}: {found[0]}"

    def figures(self) -> KeyFigures:
        with self._lock:
            return KeyFigures(self._responses, self._with_keys, self._first)
