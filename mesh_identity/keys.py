"""Key types the authority can generate and sign for, and key (de)serialisation."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(enum.StrEnum):
    """A key algorithm and size. ECDSA P-256 is the default: RSA keygen is 400x slower."""

    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_rsa(self) -> bool:
        return self in (KeyType.RSA_2048, KeyType.RSA_3072)

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise ValueError(f"{text!r} is not a key type (one of {choices})") from None


def generate_key(key_type: KeyType) -> PrivateKey:
    match key_type:
        case KeyType.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.ECDSA_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA_3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise AssertionError(key_type)  # pragma: no cover


def key_type_of(key: PublicKey | PrivateKey) -> KeyType | None:
    """The :class:`KeyType` of a key, or None when it is not one we accept."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": KeyType.ECDSA_P256, "secp384r1": KeyType.ECDSA_P384}.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072}.get(key.key_size)
    return None


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with the best available scheme when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_private_key(pem: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key; raise ValueError (with no key material in it) on failure."""
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError as err:
        if passphrase is None:
            raise ValueError("the private key is encrypted and no passphrase was given") from None
        raise ValueError("the private key is not encrypted but a passphrase was given") from err
    except ValueError:
        if passphrase is not None:
            raise ValueError("cannot decrypt the private key: wrong passphrase or corrupt key") from None
        raise ValueError("not a valid PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or key_type_of(key) is None:
        raise ValueError("unsupported private key type (use ECDSA P-256/P-384 or RSA 2048/3072)")
    return key
