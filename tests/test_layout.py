"""The floors import only downward: merger's core <- service <- rl_client, the recipe on top.

Every import statement of the packages (module level and inside functions) is read with
`ast`, so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imports_of(package: str) -> dict[str, set[str]]:
    """{module path: the absolute module names it imports} for every .py under `package`."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(REPO))] = names
    return found


def offending(package: str, forbidden: tuple[str, ...], *, skip: str = "") -> list[str]:
    """'module -> import' for each import of `package` (bar modules under `skip`) that names
    one of the `forbidden` packages or modules."""
    bad = []
    for module, names in imports_of(package).items():
        if skip and module.startswith(skip):
            continue
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{module} -> {name}")
    return bad


def test_the_merge_core_imports_neither_the_service_nor_the_client() -> None:
    assert offending("merger", ("service", "rl_client"), skip="merger/recipe/") == []


def test_the_service_imports_neither_the_recipe_nor_the_client() -> None:
    assert offending("service", ("merger.recipe", "rl_client")) == []


def test_the_client_uses_only_the_services_protocol_models() -> None:
    allowed = {"service.protocol"}
    bad = [
        f"{module} -> {name}"
        for module, names in imports_of("rl_client").items()
        for name in names
        if (name == "service" or name.startswith("service."))
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    ]
    assert bad == []
    assert offending("rl_client", ("merger.recipe",)) == []  # the merge core's helpers only


def test_the_checker_sees_lazy_imports() -> None:
    # The recipe's demo imports the service inside a function body: the walk must see it.
    assert "service.app" in imports_of("merger")["merger/recipe/demo.py"]
    assert offending("merger", ("service",)) != []  # ... and flags it without the skip
