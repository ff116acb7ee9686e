"""Corpora: bytes into a corpus directory (files, archives, any `datasets` dataset) and back as per-rank
streams."""
