"""``python -m mesh_identity``: the same as the ``mesh-identity`` command."""

from __future__ import annotations

import sys

from mesh_identity.cli import main

sys.exit(main())
