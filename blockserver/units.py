"""Temporary: sizes moved to the wire contract (`blockserver.protocol`, module `units`).

Kept only until `fusefs/cli.py` and `benchmarks/fs_bench.py` import them from
`blockserver.protocol`; then delete this file and its entry in tests/test_layering.py.
"""

from .protocol import format_size, parse_size, size_argument

__all__ = ["format_size", "parse_size", "size_argument"]
