"""Training utilities: config base, distributed helpers, engines, trainer, small helpers."""
