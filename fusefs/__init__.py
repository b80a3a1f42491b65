"""fusefs: a FUSE filesystem whose file data lives on replicated block servers."""

__version__ = "0.1.0"
