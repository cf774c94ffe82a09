"""The sidecar's packages in layers: each imports only from those below it, so that one can be read, tested and
changed without those above. The README's Layout section states the order."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "sidecar"
# From the bottom: the top-level modules (settings, errors, logs...), then each package. cli and demo start the
# server: the roof.
ORDER = ["", "telemetry", "control", "dataplane", "workers", "server"]
ROOF = {"sidecar.cli", "sidecar.demo", "sidecar.__main__"}


def _layer(module: str) -> int:
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 2 and parts[1] in ORDER else 0


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sidecar")}
    return found


def test_no_package_imports_one_above_it() -> None:
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        if module in ROOF:
            continue
        for imported in _imports(path):
            if imported in ROOF or _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(sorted(upward))


def test_the_layers_are_the_packages_there_are() -> None:
    packages = {path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()}
    assert packages == set(ORDER) - {""}
