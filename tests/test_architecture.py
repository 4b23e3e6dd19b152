"""The import rules of ARCHITECTURE.md, checked on the import statements of every module of the two packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# part -> parts it must not import (a part is "modeling_bcls" or "trainer_bcls.<subpackage>")
FORBIDDEN = {
    "modeling_bcls": {"trainer_bcls"},
    "trainer_bcls.data": {"trainer_bcls.labels", "trainer_bcls.training", "trainer_bcls.evaluation",
                          "trainer_bcls.retrieval", "trainer_bcls.towers", "trainer_bcls.hub", "modeling_bcls"},
    "trainer_bcls.labels": {"trainer_bcls.training", "trainer_bcls.evaluation", "trainer_bcls.retrieval"},
    "trainer_bcls.evaluation": {"trainer_bcls.training", "trainer_bcls.retrieval"},
    "trainer_bcls.training": {"trainer_bcls.retrieval"},
    "trainer_bcls.retrieval": {"trainer_bcls.training"},
    "trainer_bcls.towers": {"trainer_bcls.training", "trainer_bcls.retrieval", "trainer_bcls.evaluation"},
    "trainer_bcls.hub": {"trainer_bcls.training", "trainer_bcls.retrieval"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of everything `path` imports (relative imports resolved), function-level imports included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [target] + [f"{target}.{alias.name}" for alias in node.names]
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "modeling_bcls":
        return "modeling_bcls"
    if parts[0] == "trainer_bcls" and len(parts) > 1:
        return f"trainer_bcls.{parts[1]}"
    return None


SOURCES = sorted(p for pkg in ("modeling_bcls", "trainer_bcls") for p in (ROOT / pkg).rglob("*.py"))


def test_no_forbidden_import():
    bad = []
    for path in SOURCES:
        part = _part(_module_name(path))
        forbidden = FORBIDDEN.get(part, set())
        hits = sorted({m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)})
        if hits:
            bad.append(f"{path.relative_to(ROOT)} ({part}) imports {hits}")
    assert len(SOURCES) > 40
    assert not bad, "against ARCHITECTURE.md:\n" + "\n".join(bad)


def test_the_rule_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a relative import from data/ into training/ is found."""
    fake = ROOT / "trainer_bcls" / "data" / "fake_module.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from ..training.trainer import BCLSTrainer\n")
    assert "trainer_bcls.training.trainer" in _imports(fake)


def test_layout():
    top = sorted(p.name for p in (ROOT / "trainer_bcls").glob("*.py"))
    assert len(top) <= 6, top
    for package in [p.parent for p in (ROOT / "trainer_bcls").glob("*/__init__.py")] + [ROOT / "modeling_bcls" / "losses"]:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"{package}/__init__.py must say what it holds and what it may import"
