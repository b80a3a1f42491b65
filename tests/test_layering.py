"""Imports point down only (DESIGN.md section 3): the block server never imports fusefs."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def imported_modules(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module


def test_blockserver_never_imports_fusefs():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p, m in imported_modules("blockserver")
                 if m == "fusefs" or m.startswith("fusefs.")]
    assert offenders == []


def test_blockserver_uses_no_http_client_library():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p, m in imported_modules("blockserver")
                 if m.split(".")[0] in ("requests", "fuse")]
    assert offenders == []
