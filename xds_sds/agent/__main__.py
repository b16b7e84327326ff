"""``python -m xds_sds.agent --config FILE``: the node agent, loading nothing else of the command line (see
:mod:`xds_sds.agent.launch`); the same agent as ``mesh-identity agent``."""

from __future__ import annotations

import sys

from xds_sds.agent.launch import main

sys.exit(main())
