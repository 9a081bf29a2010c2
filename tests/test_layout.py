"""The import rules of design.md section 2, enforced on the source (not on what happens to be imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepspm"
LAYERS = ("fsm", "controller", "nets", "io", "simulator")
# For each layer: the deepspm layers it may import, and the third-party roots it may import (None = any).
ALLOWED_LAYERS = {
    "fsm": set(),
    "nets": set(),
    "io": set(),
    "simulator": {"io"},
    "controller": {"fsm", "nets", "io", "simulator"},
}
NETS_THIRD_PARTY = {"jax", "jaxlib", "flax", "optax", "orbax", "numpy", "sklearn", "tqdm"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_what_design_allows(layer: str) -> None:
    bad = []
    for path in layer_files(layer):
        for name in imports_of(path):
            parts = name.split(".")
            if (parts[0] == "deepspm" and len(parts) > 1 and parts[1] in LAYERS
                    and parts[1] != layer and parts[1] not in ALLOWED_LAYERS[layer]):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if parts[0] == "deepspm" and len(parts) > 1 and parts[1] == "cli":
                bad.append(f"{path.relative_to(PACKAGE)} imports the CLI")
    assert not bad, "import rules of design.md section 2 broken:\n" + "\n".join(bad)


def test_nets_import_only_the_numeric_stack() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in layer_files("nets"):
        for name in imports_of(path):
            root = name.split(".")[0]
            if root not in stdlib and root not in NETS_THIRD_PARTY and not name.startswith("deepspm.nets"):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_layout_matches_design() -> None:
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
    assert (PACKAGE / "cli.py").is_file()


def test_cli_help_runs() -> None:
    from deepspm.cli import build_parser

    text = build_parser().format_help()
    assert "COMMAND" in text
