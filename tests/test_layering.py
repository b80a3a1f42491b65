"""Imports point down only (docs/promises.md, "The data path"). fusefs and blockserver meet
only at the wire contract, `blockserver.protocol`: blockserver never imports fusefs, fusefs
imports nothing of blockserver but the contract, and the contract imports neither side."""

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
CONTRACT = "blockserver.protocol"


def imported_modules(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module


def _is_ours(dotted: str) -> bool:
    """True if `dotted` names a module or package of this repository."""
    where = REPO.joinpath(*dotted.split("."))
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def resolved_imports(path: pathlib.Path):
    """Every module the file at `path` imports, by its absolute name: relative imports are
    resolved, and `from P import N` names P.N when that is a module of ours, else P."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts[:-1]  # the package the file belongs to (for __init__: itself)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield sub if _is_ours(sub) else module


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# All that fusefs may import of blockserver.
FUSEFS_MAY_IMPORT = {CONTRACT}


def test_fusefs_imports_nothing_of_blockserver_but_the_contract():
    offenders = [f"{p.relative_to(REPO)} imports {m}"
                 for p in sorted((REPO / "fusefs").rglob("*.py")) for m in resolved_imports(p)
                 if _inside(m, "blockserver") and m not in FUSEFS_MAY_IMPORT]
    assert offenders == []


def test_the_contract_imports_neither_side():
    """Only itself, the standard library, xxhash and blake3 (optional: without it the
    contract speaks SHA-256 only): a client in another program can take the contract
    without the server or fusefs."""
    offenders = []
    for path in sorted((REPO / CONTRACT.replace(".", "/")).rglob("*.py")):
        for m in resolved_imports(path):
            top = m.split(".")[0]
            if not (_inside(m, CONTRACT) or top in sys.stdlib_module_names
                    or top in ("xxhash", "blake3")):
                offenders.append(f"{path.relative_to(REPO)} imports {m}")
    assert offenders == []


def test_blockserver_never_imports_fusefs():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p, m in imported_modules("blockserver")
                 if m == "fusefs" or m.startswith("fusefs.")]
    assert offenders == []


def test_blockserver_uses_no_http_client_library():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p, m in imported_modules("blockserver")
                 if m.split(".")[0] in ("requests", "fuse")]
    assert offenders == []


# fusefs modules from the top of the data path to the bottom (docs/promises.md). A module
# may import modules of its own layer or of layers below it, never above. A new module must
# be placed here, so the map stays the truth.
FUSEFS_LAYERS = [
    {"__main__", "cli", "mount_helper", "daemon", "embedded", "fsck", "gc", "admin", "metrics"},
    {"fuse_glue", "fuse_ops", "kernel_attrs", "paths"},
    {"filesystem"},
    {"metadata", "cache", "flusher", "filedata", "siblings", "journal", "follower", "loading", "lease",
     "checkpoint", "segments", "leftovers", "antientropy", "membership", "scrub", "replicas"},
    {"cluster", "memstore", "health", "placement", "blockstore", "superblock", "host", "mounts",
     "progress", "localroom"},
    {"transport"},
    {"errors", "__init__"},
]


def layer_of(module: str) -> int:
    for depth, names in enumerate(FUSEFS_LAYERS):
        if module in names:
            return depth
    raise AssertionError(f"fusefs.{module} is in no layer of FUSEFS_LAYERS; place it there")


def fusefs_imports():
    for path in sorted((REPO / "fusefs").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusefs."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("fusefs.")]
            else:
                continue
            for name in names:
                name = name.split(".")[0]
                # `from . import __version__` names something of the package, not a module
                yield path.stem, name if (REPO / "fusefs" / f"{name}.py").exists() else "__init__"


def test_fusefs_imports_point_down():
    upward = [f"fusefs.{src} imports fusefs.{dst}" for src, dst in fusefs_imports()
              if layer_of(dst) < layer_of(src)]
    assert upward == []


def test_only_transport_uses_requests_and_only_the_adapter_uses_fuse():
    for path, module in imported_modules("fusefs"):
        top = module.split(".")[0]
        if top in ("requests", "urllib3"):
            assert path.stem == "transport", f"{path.name} imports {module}"
        if top == "fuse":
            assert path.stem in ("fuse_glue", "fuse_ops", "daemon"), \
                f"{path.name} imports {module}"


def test_every_package_is_installed():
    """`pip install .` ships only the packages pyproject.toml lists: a new subpackage
    (such as blockserver/protocol/) left out would be missing from an installed copy."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".")
             for top in ("fusefs", "blockserver") for p in (REPO / top).rglob("__init__.py")}
    assert found - listed == set()
