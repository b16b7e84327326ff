"""Who may obtain which SVID from the signing API: a pure function of the caller, the identity and the registry.

A caller authenticated by its X.509-SVID ``P`` may obtain ``S`` (an X.509-SVID or a JWT-SVID) when

* ``S == P``, a renewal: a node agent renews its own identity; a workload ``P`` must still be in the registry;
* or ``P`` is the agent of host ``H`` and the registry places an instance of ``S`` on ``H``
  (:meth:`~mesh_identity.mesh.model.Mesh.identities_on_host`, the mesh file's ``instances[].host``).

Nothing else: no identity under ``/mesh-identity/`` other than an agent's own (the control plane's identities
are never issued here), nothing outside the trust domain. The registry is read at the time of each request, so a
workload that moves to another host or leaves the mesh is refused from the next request on.
"""

from __future__ import annotations

from mesh_identity.mesh.model import Mesh
from mesh_identity.registry.base import RESERVED_PREFIX, agent_host
from mesh_identity.spiffe import SpiffeId


def denied(caller: SpiffeId, requested: SpiffeId, mesh: Mesh) -> str | None:
    """Why ``caller`` may not obtain ``requested`` under ``mesh`` (None: it may)."""
    trust_domain = mesh.trust_domain
    if requested.trust_domain != trust_domain:
        return f"{requested} is not in trust domain {trust_domain}"
    if caller.trust_domain != trust_domain:
        return f"{caller} is not in trust domain {trust_domain}"
    host = agent_host(caller)
    if requested.path.startswith(RESERVED_PREFIX):
        if requested == caller and host is not None:
            return None
        return f"{requested} is one of the control plane's own identities (under {RESERVED_PREFIX}): never issued here"
    if requested == caller:
        if requested in mesh.identities:
            return None
        return f"{requested} is no longer a workload of the registry"
    if host is None:
        return f"{caller} may obtain only its own identity, not {requested}"
    if requested in mesh.identities_on_host(host):
        return None
    if requested in mesh.identities:
        return f"the registry places no instance of {requested} on host {host!r}, the host of {caller}"
    return f"{requested} is not a workload of the registry"
