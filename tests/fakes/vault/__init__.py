"""A HashiCorp Vault HTTP API server for tests, with real crypto.

No Vault can be installed on the machines this project is tested on, so the Vault provider's tests drive this
server through the real ``hvac`` client, over real HTTP or HTTPS on an ephemeral loopback port. It speaks the
parts of Vault's documented HTTP API that a PKI client uses, with Vault's response envelope (``request_id``,
``lease_id``, ``lease_duration``, ``renewable``, ``data``, ``auth``, ``warnings``) and error shape
(``{"errors": [...]}``):

* ``sys/`` endpoints (:mod:`~tests.fakes.vault.sys`): health and seal status, capabilities, mounts, auth
  methods, policies;
* token, AppRole and Kubernetes auth (:mod:`~tests.fakes.vault.auth`);
* the PKI secrets engine on any number of mounts (:mod:`~tests.fakes.vault.pki`);
* ``X-Vault-Token`` and ACL policies (:mod:`~tests.fakes.vault.acl`); ``X-Vault-Namespace`` (a token works only
  in its own namespace and those below it; mounts, auth methods and policies belong to a namespace). Only the
  header selects a namespace, not a path prefix.

The modules: :mod:`~tests.fakes.vault.api` (request, response, envelope, errors), :mod:`~tests.fakes.vault.params`
(Vault's parameter types), :mod:`~tests.fakes.vault.state` (the in-memory state), :mod:`~tests.fakes.vault.routing`
(HTTP parsing, dispatch, error replies), :mod:`~tests.fakes.vault.server` (:class:`VaultServer`: lifecycle and
test controls). ``python -m tests.fakes.vault`` serves one in its own process (:mod:`~tests.fakes.vault.__main__`).

Test controls in Python: :meth:`~VaultServer.seal`, :meth:`~VaultServer.unseal`, :meth:`~VaultServer.stop` and
:meth:`~VaultServer.start` (an outage: connections are refused and open ones are cut), fail or drop the next N
requests, token TTLs, request counters per path, and shortcuts to create namespaces, mounts, roles, policies,
tokens, AppRole credentials and Kubernetes roles.
"""

from tests.fakes.vault.api import ApiError
from tests.fakes.vault.params import glob_match, go_duration, parse_seconds
from tests.fakes.vault.server import ListenerTLS, VaultServer
from tests.fakes.vault.state import Issuer, PkiRole, RequestRecord

__all__ = [
    "ApiError",
    "Issuer",
    "ListenerTLS",
    "PkiRole",
    "RequestRecord",
    "VaultServer",
    "glob_match",
    "go_duration",
    "parse_seconds",
]
