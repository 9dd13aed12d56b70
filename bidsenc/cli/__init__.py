"""Command-line entry points: ``bidsenc`` and ``bidsenc-demo``."""
