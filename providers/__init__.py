"""CA providers, each a pluggy plugin registered through the ``mesh_identity`` entry-point group."""
