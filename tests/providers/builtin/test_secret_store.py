"""The built-in CA with its roots in a Kubernetes Secret (``store: kubernetes``), against the Kubernetes API test
server through the real ``kubernetes`` client: the Secret created and loaded again, the rotation steps written to
it at the resourceVersion read (a stale write refused, the state intact), every malformed Secret refused with a
message naming the Secret and its data key, no unencrypted key ever in it, API faults, options, doctor, and the
provider contract."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography.hazmat.primitives import serialization

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.errors import ConfigError, RotationError, StateError
from mesh_identity.keys import KeyType, generate_key, private_key_pem
from mesh_identity.profile import build_root
from mesh_identity.provider import CAProvider, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import cert_pem
from mesh_identity.verify import chain_problem
from plugins.testing import ProviderContract
from providers.builtin import secretstore
from providers.builtin.keyfile import encrypted_key_pem, key_encryption
from providers.builtin.provider import SPEC, BuiltinProvider
from providers.builtin.secretstore import SecretRootStore
from tests.fakes.kube import ApiError
from tests.fakes.kube.workloads import schema_errors
from tests.providers.builtin.secretcluster import (
    NAMESPACE_NAME,
    PASSPHRASE,
    SECRET_NAME,
    VALIDATED_SECRET,
    MakeProvider,
    SecretCluster,
)

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")
WHERE = f"Secret {NAMESPACE_NAME}/{SECRET_NAME}"


def _store(provider: BuiltinProvider) -> SecretRootStore:
    assert isinstance(provider.store, SecretRootStore)
    return provider.store


def _core(cluster: SecretCluster) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cluster.server.client_configuration()))


def _set_data(cluster: SecretCluster, changes: dict[str, bytes | None]) -> None:
    """Change data keys of the Secret (None removes one) as a user would, with a PUT through the real client."""
    core = _core(cluster)
    secret = core.read_namespaced_secret(SECRET_NAME, NAMESPACE_NAME)
    data = dict(secret.data or {})
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = base64.b64encode(value).decode()
    secret.data = data
    core.replace_namespaced_secret(SECRET_NAME, NAMESPACE_NAME, secret)


def _no_plain_key(cluster: SecretCluster, providers: list[BuiltinProvider]) -> None:
    """No data value of the Secret holds a root key unencrypted (PEM or DER), and every key is encrypted."""
    secret = cluster.secret()
    assert secret is not None
    raw = json.dumps(secret).encode()
    for provider in providers:
        for root in _store(provider).roots:
            der = root.key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            for value in cluster.data().values():
                assert der not in value
                assert private_key_pem(root.key) not in value
            assert base64.b64encode(der) not in raw
    for key, value in cluster.data().items():
        assert b"BEGIN PRIVATE KEY" not in value and b"BEGIN EC PRIVATE KEY" not in value
        if key.endswith(".key"):
            encryption = key_encryption(value)
            assert encryption is not None and encryption.strong, key


# -- creating and loading ----------------------------------------------------------------------------------


def test_the_first_provider_creates_the_secret(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    provider = make_secret_provider()
    assert provider.created is True
    secret = secret_cluster.secret()
    assert secret is not None
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "mesh-identity",
        "app.kubernetes.io/component": "ca",
    }
    assert sorted(secret["data"]) == ["ca.json", "root-1.key", "root-1.pem"]
    assert secret_cluster.manifest() == {
        "version": 1,
        "trust_domain": "example.org",
        "roots": ["root-1"],
        "active": "root-1",
        "phase": "steady",
    }
    assert secret_cluster.data()["root-1.pem"] == cert_pem(provider.trust_bundle().authorities[0])
    assert schema_errors(secret) == []
    _no_plain_key(secret_cluster, [provider])


def test_the_served_secrets_are_validated_strictly(secret_cluster: SecretCluster) -> None:
    """The test server refuses a Secret the official schemas refuse, so every Secret the store wrote passed them
    (the client here refuses such a body itself, so it is written to the server's store directly)."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "x", "namespace": NAMESPACE_NAME},
        "type": "Opaque",
        "extra": 1,
    }
    with pytest.raises(ApiError) as caught:
        secret_cluster.server.put_object(VALIDATED_SECRET, body)
    assert caught.value.code == 422
    assert "('extra' was unexpected)" in str(caught.value.status())


def test_a_restart_loads_the_same_root(make_secret_provider: MakeProvider) -> None:
    first = make_secret_provider()
    authority = Authority(first, AuthoritySettings(TD))
    authority.start()
    svid = authority.issue(WEB)
    second = make_secret_provider()
    assert second.created is False
    assert second.trust_bundle().authorities == first.trust_bundle().authorities
    assert chain_problem(svid.leaf, svid.chain, second.trust_bundle(), datetime.now(UTC)) is None


def test_without_create_a_missing_secret_is_refused(
    make_secret_provider: MakeProvider, make_context: Callable[..., ProviderContext]
) -> None:
    with pytest.raises(StateError, match=f"no CA state: {WHERE} does not exist"):
        make_secret_provider(make_context(create=False))


# -- rotation ----------------------------------------------------------------------------------------------


def test_each_rotation_step_is_written_to_the_secret(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    provider = make_secret_provider()
    old = provider.trust_bundle().authorities[0]
    new = provider.prepare_root()
    assert secret_cluster.manifest()["roots"] == ["root-1", "root-2"]
    assert secret_cluster.manifest()["phase"] == "prepared"
    assert secret_cluster.data()["root-2.pem"] == cert_pem(new)
    assert make_secret_provider().root_phase() == "prepared"
    _no_plain_key(secret_cluster, [provider])

    provider.activate_root()
    assert (secret_cluster.manifest()["active"], secret_cluster.manifest()["phase"]) == ("root-2", "activated")
    again = make_secret_provider()
    assert again.root_phase() == "activated"
    assert _store(again).active.certificate == new

    assert provider.retire_root() == (old,)
    secret = secret_cluster.secret()
    assert secret is not None
    assert sorted(secret["data"]) == ["ca.json", "root-2.key", "root-2.pem"]
    assert secret_cluster.manifest()["phase"] == "steady"
    assert make_secret_provider().trust_bundle().authorities == (new,)
    assert schema_errors(secret) == []
    _no_plain_key(secret_cluster, [provider])


def test_a_stale_write_is_refused_and_the_state_kept(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    mine, theirs = make_secret_provider(), make_secret_provider()
    their_root = theirs.prepare_root()  # the other replica advances first
    written = secret_cluster.secret()
    message = (
        rf"cannot prepare a root: {WHERE} changed since it was read at resourceVersion \d+ \(another replica\?\); "
        r"nothing was written; read it again: phase 'prepared', roots root-1, root-2"
    )
    with pytest.raises(RotationError, match=message):
        mine.prepare_root()
    assert secret_cluster.secret() == written  # their root stands; ours was never written
    assert mine.root_phase() == "prepared"
    assert mine.trust_bundle().authorities == theirs.trust_bundle().authorities
    assert their_root in mine.trust_bundle().authorities
    mine.activate_root()  # from the state read again, the next step goes through
    assert secret_cluster.manifest()["active"] == "root-2"
    with pytest.raises(RotationError, match="changed since it was read"):
        theirs.activate_root()
    assert theirs.root_phase() == "activated"


def test_a_failed_write_changes_nothing(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    provider = make_secret_provider()
    before, bundle = secret_cluster.secret(), provider.trust_bundle()
    secret_cluster.server.inject_error("update", "secrets", code=500)
    with pytest.raises(RotationError, match=f"cannot prepare a root: writing {WHERE} failed, nothing changed: .*500"):
        provider.prepare_root()
    assert secret_cluster.secret() == before
    assert provider.root_phase() == "steady"
    assert provider.trust_bundle() == bundle
    provider.prepare_root()
    assert secret_cluster.manifest()["phase"] == "prepared"


def test_reload_reads_the_secret_again(make_secret_provider: MakeProvider) -> None:
    mine, theirs = make_secret_provider(), make_secret_provider()
    theirs.prepare_root()
    assert mine.root_phase() == "steady"
    mine.reload()
    assert mine.root_phase() == "prepared"
    assert mine.trust_bundle().authorities == theirs.trust_bundle().authorities


# -- what is read is checked -------------------------------------------------------------------------------


def _other_key_pem() -> bytes:
    return encrypted_key_pem(generate_key(KeyType.ECDSA_P256), PASSPHRASE.encode())


def _foreign_root() -> bytes:
    return cert_pem(
        build_root(generate_key(KeyType.ECDSA_P256), TrustDomain("other.org"), timedelta(days=1), datetime.now(UTC))
    )


def _manifest(**fields: Any) -> bytes:
    manifest = {"version": 1, "trust_domain": "example.org", "roots": ["root-1"], "active": "root-1", "phase": "steady"}
    manifest.update(fields)
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ca.json": None}, f"{WHERE} holds no CA state: data key ca.json is missing"),
        ({"ca.json": b"{not json"}, f"{WHERE} data key ca.json is corrupt: Expecting property name"),
        ({"ca.json": b"[]"}, f"{WHERE} data key ca.json is corrupt: not a version 1 manifest"),
        (
            {"ca.json": _manifest(trust_domain="other.org")},
            f"{WHERE} data key ca.json belongs to trust domain 'other.org', not example.org",
        ),
        (
            {"ca.json": _manifest(roots=["../x"])},
            f"{WHERE} data key ca.json is corrupt: 'roots' must list root names like 'root-1'",
        ),
        (
            {"ca.json": _manifest(phase="half")},
            f"{WHERE} data key ca.json is corrupt: phase 'half' is not one of steady, prepared, activated",
        ),
        (
            {"ca.json": _manifest(roots=["root-1", "root-2"])},
            f"{WHERE}: root root-2 is listed in ca.json but data key root-2.pem is missing",
        ),
        ({"root-1.key": None}, f"{WHERE}: root root-1 is listed in ca.json but data key root-1.key is missing"),
        ({"root-1.pem": b"junk"}, f"{WHERE} data key root-1.pem is corrupt: not a PEM certificate"),
        ({"root-1.pem": _foreign_root()}, f"{WHERE} data key root-1.pem: the root is not of trust domain example.org"),
        ({"root-1.key": _other_key_pem()}, f"{WHERE} data key root-1.key does not match the certificate root-1.pem"),
        (
            {"root-1.key": private_key_pem(generate_key(KeyType.ECDSA_P256))},
            f"{WHERE} data key root-1.key is not encrypted: a root key in a Secret must be",
        ),
    ],
    ids=[
        "no-manifest",
        "manifest-not-json",
        "manifest-not-v1",
        "other-trust-domain",
        "path-in-name",
        "bad-phase",
        "listed-root-missing",
        "key-missing",
        "bad-pem",
        "foreign-root",
        "key-mismatch",
        "plain-key",
    ],
)
def test_a_malformed_secret_is_refused(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider, changes: dict[str, bytes | None], message: str
) -> None:
    provider = make_secret_provider()
    _set_data(secret_cluster, changes)
    with pytest.raises(StateError) as caught:
        make_secret_provider()
    assert str(caught.value).startswith(message), caught.value
    before = provider.trust_bundle()
    with pytest.raises(StateError, match="^" + message[:40].replace("(", r"\(")):
        provider.reload()
    assert provider.trust_bundle() == before  # a failed reload keeps the state it had


def test_the_wrong_passphrase_is_refused(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider, tmp_path: Path
) -> None:
    make_secret_provider()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    with pytest.raises(StateError) as caught:
        make_secret_provider(key_encryption_file=str(wrong))
    assert str(caught.value) == (
        f"{WHERE} data key root-1.key: cannot decrypt the private key: wrong passphrase or corrupt key (is "
        f"ca.provider_options.key_encryption_file {wrong} the passphrase the Secret was written with?)"
    )


def test_data_that_is_not_base64_is_refused(make_secret_provider: MakeProvider) -> None:
    """The API server never holds such data (it refuses it on write), so the answer is given to the parser."""
    store = _store(make_secret_provider())
    answer: dict[str, Any] = {
        "metadata": {"name": SECRET_NAME, "resourceVersion": "7"},
        "type": "Opaque",
        "data": {"ca.json": "not base64!"},
    }
    with pytest.raises(StateError, match=f"^{WHERE} data key ca.json is not base64$"):
        store._parse(answer)
    answer["data"]["ca.json"] = 7
    with pytest.raises(StateError, match=f"^{WHERE} data key ca.json is not a base64 string$"):
        store._parse(answer)
    answer["type"] = "kubernetes.io/tls"
    with pytest.raises(StateError, match=f"^{WHERE} is of type 'kubernetes.io/tls', not Opaque"):
        store._parse(answer)


# -- faults of the API server ------------------------------------------------------------------------------


def test_a_forbidden_read_is_a_config_error(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    secret_cluster.server.deny("get", "secrets")
    with pytest.raises(ConfigError) as caught:
        make_secret_provider()
    assert str(caught.value).startswith(
        f"cannot read the CA state from {WHERE}: not allowed to read Secret {NAMESPACE_NAME}/{SECRET_NAME} "
        "(403 Forbidden)"
    )


def test_a_forbidden_create_is_a_config_error(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    secret_cluster.server.deny("create", "secrets")
    with pytest.raises(ConfigError) as caught:
        make_secret_provider()
    assert str(caught.value).startswith(
        f"cannot create {WHERE} for the CA's first root: not allowed to create Secret "
        f"{NAMESPACE_NAME}/{SECRET_NAME} (403 Forbidden)"
    )
    assert secret_cluster.secret() is None


def test_a_server_error_is_a_state_error(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    secret_cluster.server.inject_error("get", "secrets", code=500)
    with pytest.raises(StateError) as caught:
        make_secret_provider()
    assert str(caught.value).startswith(f"cannot read the CA state from {WHERE}: the Kubernetes API at ")
    assert "answered 500 InternalError to read Secret" in str(caught.value)
    secret_cluster.server.inject_error("create", "secrets", code=500)
    with pytest.raises(StateError, match=f"cannot create {WHERE} for the CA's first root: .* answered 500"):
        make_secret_provider()
    assert secret_cluster.secret() is None


def test_an_unreachable_server_on_reload_keeps_the_state(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    provider = make_secret_provider()
    bundle = provider.trust_bundle()
    secret_cluster.server.go_down()
    with pytest.raises(StateError, match=f"cannot read the CA state from {WHERE}: cannot reach the Kubernetes API"):
        provider.reload()
    with pytest.raises(RotationError, match=f"writing {WHERE} failed, nothing changed: cannot reach"):
        provider.prepare_root()
    assert provider.trust_bundle() == bundle
    assert provider.root_phase() == "steady"
    secret_cluster.server.come_up()
    provider.reload()
    assert provider.trust_bundle() == bundle


def test_a_deleted_secret_is_named_on_reload(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    provider = make_secret_provider()
    _core(secret_cluster).delete_namespaced_secret(SECRET_NAME, NAMESPACE_NAME)
    with pytest.raises(StateError, match=f"^{WHERE} does not exist any more"):
        provider.reload()


# -- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_encryption_file": None}, "ca.provider_options.key_encryption_file: required with store: kubernetes"),
        (
            {"key_encryption_file": "/nonexistent/pass"},
            "ca.provider_options.key_encryption_file: cannot read /nonexistent/pass: No such file or directory",
        ),
        ({"root_cert_file": "/x.pem"}, "ca.provider_options.root_cert_file: not with store: kubernetes"),
        ({"ca_key_file": "/x.key"}, "ca.provider_options.ca_key_file: not with store: kubernetes"),
        ({"passphrase_file": "/x"}, "ca.provider_options.passphrase_file: not with store: kubernetes"),
        ({"secret_name": "Mesh_CA"}, "ca.provider_options.secret_name: 'Mesh_CA' is not a valid Secret name"),
        ({"secret_namespace": "a.b"}, "ca.provider_options.secret_namespace: 'a.b' is not a valid namespace name"),
        (
            {"kubeconfig": "/nonexistent/kubeconfig"},
            "ca.provider_options.kubeconfig: no kubeconfig file at /nonexistent/kubeconfig",
        ),
        ({"store": "etcd"}, "ca.provider_options.store: 'etcd' is not one of files, kubernetes"),
    ],
    ids=[
        "no-key-file",
        "unreadable-key-file",
        "own-root",
        "own-intermediate",
        "passphrase-file",
        "bad-name",
        "bad-namespace",
        "no-kubeconfig",
        "unknown-store",
    ],
)
def test_bad_options_are_refused(make_secret_provider: MakeProvider, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_secret_provider(**options)
    assert str(caught.value).startswith(message), caught.value


def test_an_empty_key_file_is_refused(make_secret_provider: MakeProvider, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"^ca.provider_options.key_encryption_file: {empty} is empty$"):
        make_secret_provider(key_encryption_file=str(empty))


def test_secret_options_need_store_kubernetes(
    make_context: Callable[..., ProviderContext], secret_cluster: SecretCluster
) -> None:
    options = SPEC.validate_options({"key_encryption_file": str(secret_cluster.key_file)})
    with pytest.raises(ConfigError, match=r"^ca\.provider_options\.key_encryption_file: only with store: kubernetes$"):
        SPEC.factory(make_context(), options)


def test_in_cluster_the_pod_namespace_is_the_default(
    secret_cluster: SecretCluster,
    make_secret_provider: MakeProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = tmp_path / "serviceaccount"
    environ = secret_cluster.server.write_in_cluster_files(account)  # its namespace file says mesh-identity
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(secretstore, "SERVICE_ACCOUNT_DIR", account)
    provider = make_secret_provider(secret_namespace=None, kubeconfig=None)
    assert provider.created is True
    assert secret_cluster.secret("mesh-identity") is not None
    (account / "namespace").unlink()
    with pytest.raises(
        ConfigError, match=r"^ca\.provider_options\.secret_namespace: not set, and not running in a pod"
    ):
        make_secret_provider(secret_namespace=None, kubeconfig=None)


# -- doctor ------------------------------------------------------------------------------------------------


def test_doctor_checks_the_secret(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    provider = make_secret_provider()
    checks = {c.name: c for c in provider.doctor()}
    assert checks["CA Secret"].ok, checks["CA Secret"].detail
    assert checks["CA Secret"].detail == f"{WHERE}: readable, phase 'steady', roots root-1"
    assert checks["root key encryption"].ok
    assert checks["root key encryption"].detail.startswith("PBKDF2-HMAC-SHA256, 600,000 iterations, AES-256-CBC")
    assert checks["retired root keys"].ok
    rule = secret_cluster.server.deny("get", "secrets")
    failing = {c.name: c for c in provider.doctor()}["CA Secret"]
    assert not failing.ok
    assert failing.detail.startswith(f"cannot read the CA state from {WHERE}: not allowed to read Secret")
    secret_cluster.server.allow(rule)
    make_secret_provider().prepare_root()
    behind = {c.name: c for c in provider.doctor()}["CA Secret"]
    assert (
        behind.detail
        == f"{WHERE}: readable, phase 'prepared', roots root-1, root-2 (changed since this process read it)"
    )


def test_doctor_names_root_data_the_manifest_does_not_list(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    provider = make_secret_provider()
    _set_data(secret_cluster, {"root-7.key": _other_key_pem()})
    provider.reload()
    check = {c.name: c for c in provider.doctor()}["retired root keys"]
    assert (check.ok, check.detail) == (False, f"still in the Secret: {WHERE} data key root-7.key")
    provider.prepare_root()  # the next write holds only what the manifest lists
    assert "root-7.key" not in secret_cluster.data()


# -- the contract ------------------------------------------------------------------------------------------


class TestSecretStoreContract(ProviderContract):
    @pytest.fixture
    def provider(self, make_secret_provider: MakeProvider) -> CAProvider:
        return make_secret_provider()


def test_the_secret_kind_is_the_validated_one(secret_cluster: SecretCluster) -> None:
    assert VALIDATED_SECRET in secret_cluster.server.kinds
