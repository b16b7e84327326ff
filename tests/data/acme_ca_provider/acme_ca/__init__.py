"""A third-party CA provider: signs every workload directly with an in-memory root (per-workload only)."""
