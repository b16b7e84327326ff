"""Root keys at rest: PKCS#8 ``ENCRYPTED PRIVATE KEY`` (PBES2, RFC 8018), PBKDF2-HMAC-SHA256 with 600,000
iterations, AES-256-CBC.

The cost: OWASP's Password Storage Cheat Sheet recommends at least 600,000 iterations for PBKDF2-HMAC-SHA256,
and :data:`KDF_ITERATIONS` is that. One derivation takes about 0.2 s on one core; it is paid once per root key
when the CA state is loaded and when a root is written, never per signature. Earlier versions wrote the same
structure with 2,048 iterations (what ``cryptography``'s ``BestAvailableEncryption`` uses, and ``cryptography``
offers no way to raise it for PKCS#8: its encryption builder takes OpenSSH and PKCS#12 only); the store
re-encrypts such keys when it loads them (:func:`needs_reencryption`).

Why PBKDF2 rather than scrypt: the file stays a standard PKCS#8 key that ``cryptography``, OpenSSL
(``openssl pkey -in root-1.key``), HSM import tools and earlier versions of this program all read; PBKDF2 is
FIPS 140 approved; and a load does not need scrypt's 128 MiB per derivation at OWASP's scrypt cost.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from mesh_identity.keys import PrivateKey

KDF_ITERATIONS = 600_000
DESCRIPTION = f"PBKDF2-HMAC-SHA256, {KDF_ITERATIONS:,} iterations, AES-256-CBC"

PEM_LABEL = "ENCRYPTED PRIVATE KEY"
PBES2 = "1.2.840.113549.1.5.13"
PBKDF2 = "1.2.840.113549.1.5.12"
HMAC_SHA256 = "1.2.840.113549.2.9"
HMAC_SHA1 = "1.2.840.113549.2.7"  # PBKDF2's default PRF when the parameters name none
AES_256_CBC = "2.16.840.1.101.3.4.1.42"

_SEQUENCE, _INTEGER, _OCTET_STRING, _NULL, _OID = 0x30, 0x02, 0x04, 0x05, 0x06


# -- writing -----------------------------------------------------------------------------------------------


def encrypted_key_pem(key: PrivateKey, passphrase: bytes, iterations: int = KDF_ITERATIONS) -> bytes:
    """``key`` as an encrypted PKCS#8 PEM: PBES2 with PBKDF2-HMAC-SHA256 (``iterations``) and AES-256-CBC."""
    if not passphrase:
        raise ValueError("an empty passphrase encrypts nothing")
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, iv = os.urandom(16), os.urandom(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    pbkdf2_params = _seq(_octets(salt), _integer(iterations), _seq(_oid(HMAC_SHA256), _der(_NULL, b"")))
    pbes2_params = _seq(_seq(_oid(PBKDF2), pbkdf2_params), _seq(_oid(AES_256_CBC), _octets(iv)))
    der = _seq(_seq(_oid(PBES2), pbes2_params), _octets(encrypted))
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {PEM_LABEL}-----", *lines, f"-----END {PEM_LABEL}-----", ""]).encode()


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _seq(*parts: bytes) -> bytes:
    return _der(_SEQUENCE, b"".join(parts))


def _octets(data: bytes) -> bytes:
    return _der(_OCTET_STRING, data)


def _integer(value: int) -> bytes:
    return _der(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    return _der(_OID, bytes([40 * first + second]) + b"".join(map(_base128, rest)))


def _base128(arc: int) -> bytes:
    digits = [arc & 0x7F]
    while arc > 0x7F:
        arc >>= 7
        digits.append(0x80 | (arc & 0x7F))
    return bytes(reversed(digits))


# -- reading what a key file says about its encryption ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEncryption:
    """How an ``ENCRYPTED PRIVATE KEY`` is protected (OIDs, dotted); ``iterations`` None for a non-PBKDF2 KDF."""

    scheme: str
    kdf: str | None = None
    iterations: int | None = None
    prf: str | None = None
    cipher: str | None = None

    @property
    def strong(self) -> bool:
        """Ours: PBES2, PBKDF2-HMAC-SHA256 at :data:`KDF_ITERATIONS` or more, AES-256-CBC."""
        return (
            (self.scheme, self.kdf, self.prf, self.cipher) == (PBES2, PBKDF2, HMAC_SHA256, AES_256_CBC)
            and self.iterations is not None
            and self.iterations >= KDF_ITERATIONS
        )

    def describe(self) -> str:
        if self.kdf == PBKDF2 and self.iterations is not None:
            prf = {HMAC_SHA256: "HMAC-SHA256", HMAC_SHA1: "HMAC-SHA1"}.get(self.prf or "", self.prf)
            cipher = "AES-256-CBC" if self.cipher == AES_256_CBC else f"cipher {self.cipher}"
            return f"PBKDF2-{prf}, {self.iterations:,} iterations, {cipher}"
        return f"encryption scheme {self.scheme}"


def key_encryption(pem: bytes) -> KeyEncryption | None:
    """What protects the key in ``pem``; None when it is not an encrypted PKCS#8 key (a plain key).
    ValueError when it claims to be one and cannot be read."""
    text = pem.decode("ascii", errors="replace").strip().splitlines()
    if not text or text[0].strip() != f"-----BEGIN {PEM_LABEL}-----":
        return None
    try:
        der = base64.b64decode("".join(line.strip() for line in text[1:-1]), validate=True)
        (algorithm, _) = _children(der, _element(der, 0))
        scheme_oid, *params = _children(der, algorithm)
        scheme = _read_oid(der, scheme_oid)
        if scheme != PBES2 or not params:
            return KeyEncryption(scheme)
        kdf_alg, cipher_alg = _children(der, params[0])
        kdf_oid, *kdf_params = _children(der, kdf_alg)
        cipher = _read_oid(der, _children(der, cipher_alg)[0])
        kdf = _read_oid(der, kdf_oid)
        if kdf != PBKDF2 or not kdf_params:
            return KeyEncryption(scheme, kdf, cipher=cipher)
        _salt, count, *optional = _children(der, kdf_params[0])
        iterations = int.from_bytes(der[count[1] : count[2]], "big")
        prf_alg = [e for e in optional if e[0] == _SEQUENCE]
        prf = _read_oid(der, _children(der, prf_alg[0])[0]) if prf_alg else HMAC_SHA1
        return KeyEncryption(scheme, kdf, iterations, prf, cipher)
    except (ValueError, IndexError) as err:
        raise ValueError(f"not a readable encrypted PKCS#8 key: {err}") from None


def needs_reencryption(pem: bytes) -> bool:
    """Whether an encrypted key should be written again with our scheme (weaker, or not readable here)."""
    try:
        encryption = key_encryption(pem)
    except ValueError:
        return True
    return encryption is not None and not encryption.strong


_Element = tuple[int, int, int]  # tag, start of content, end of content


def _element(der: bytes, at: int) -> _Element:
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _children(der: bytes, parent: _Element) -> list[_Element]:
    tag, at, end = parent
    if tag != _SEQUENCE:
        raise ValueError("expected a SEQUENCE")
    out = []
    while at < end:
        element = _element(der, at)
        out.append(element)
        at = element[2]
    return out


def _read_oid(der: bytes, element: _Element) -> str:
    tag, start, end = element
    if tag != _OID or start == end:
        raise ValueError("expected an OBJECT IDENTIFIER")
    content = der[start:end]
    first = min(content[0] // 40, 2)
    parts = [first, content[0] - 40 * first]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))
