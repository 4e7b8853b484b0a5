"""The applications behind ``python -m hybridgen ...``: generate, demo, bench and the command line."""
