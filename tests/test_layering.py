"""merging_core never imports the service layer or its web/database stack."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"app", "fastapi", "sqlalchemy", "alembic", "httpx", "starlette", "uvicorn"}
PACKAGE = Path(__file__).resolve().parents[1] / "merging_core"


def test_merging_core_imports_point_down_only() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_methods_are_pure_tensor_code() -> None:
    for path in (PACKAGE / "methods").glob("*.py"):
        source = path.read_text()
        for io_name in ("open(", "safetensors", "Path(", "transformers"):
            assert io_name not in source, f"{path.name} does I/O or touches models ({io_name})"
