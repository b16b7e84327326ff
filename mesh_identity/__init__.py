"""mesh-identity: SPIFFE X.509-SVIDs for an Envoy service mesh, from pluggable CAs, rotated and delivered
over SDS.

The core (this package) depends on nothing of ``providers``, ``xds_sds`` or ``plugins``; they depend on it.
"""

from __future__ import annotations

from mesh_identity.errors import MeshIdentityError
from mesh_identity.keys import KeyType
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid

__all__ = ["KeyType", "MeshIdentityError", "SpiffeId", "TrustBundle", "TrustDomain", "X509Svid"]
