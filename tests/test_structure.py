"""The code stays readable: no function over 60 lines, no module over 450, outside tests/ and bench/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION, MAX_MODULE = 60, 450


def sources():
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] not in ("tests", "bench") and not rel.parts[0].startswith("."):
            yield rel, p.read_text(encoding="utf-8")


def test_no_long_functions_or_modules():
    found = list(sources())
    assert any(rel.name == "model.py" for rel, _ in found) and any(rel.parts[0] == "server" for rel, _ in found)
    too_long = []
    for rel, src in found:
        if len(src.splitlines()) > MAX_MODULE:
            too_long.append(f"{rel}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
    assert not too_long, "\n".join(too_long)
