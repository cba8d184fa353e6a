"""Imports flow one way, as docs/architecture.md's table says; this test reads that table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def allowed_imports() -> dict[str, set[str]]:
    """Parse the '| `unit` | `a`, `b` |' rows of the 'Import rules' table."""
    return _table("## Import rules")


def forbidden_imports() -> dict[str, set[str]]:
    return _table("## Third-party limits")


def _table(heading: str) -> dict[str, set[str]]:
    text = DOC.read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([\w.]+)`\s*\|([^|]*)\|", line)
        if m:
            rules[m.group(1)] = set(re.findall(r"`([\w.]+)`", m.group(2)))
    return rules


def unit_of(module: str) -> str:
    """inhouse.model.attention -> model; inhouse.cli -> cli."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def imports_of(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


def violations(rules: dict[str, set[str]], root: Path) -> list[str]:
    bad = []
    for path in sorted((root / "inhouse").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts)
        if module == "inhouse.__init__":
            continue
        unit = unit_of(module)
        package = module.rsplit(".", 1)[0]  # the package a relative import starts from
        for imp in imports_of(path, package):
            if not imp.startswith("inhouse.") or unit_of(imp) == unit:
                continue
            if unit_of(imp) not in rules.get(unit, set()):
                bad.append(f"{module} imports {imp}")
    return bad


def test_every_unit_is_in_the_map():
    units = {unit_of(".".join(p.relative_to(ROOT).with_suffix("").parts))
             for p in (ROOT / "inhouse").rglob("*.py")} - {"__init__"}
    missing = units - set(allowed_imports())
    assert not missing, f"docs/architecture.md has no import rule for {sorted(missing)}"


def test_imports_follow_the_documented_order():
    assert violations(allowed_imports(), ROOT) == []


def test_third_party_limits():
    bad = []
    for path in sorted((ROOT / "inhouse").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        banned = forbidden_imports().get(unit_of(module), set())
        for imp in imports_of(path, module.rsplit(".", 1)[0]):
            if imp.split(".")[0] in banned:
                bad.append(f"{module} imports {imp}")
    assert forbidden_imports()["engine"] >= {"openai_harmony", "fastapi"}
    assert bad == []


def test_ray_is_imported_by_scaleout_alone():
    """Ray is an extra: one machine never needs it, so nothing outside scaleout/ imports it."""
    bad = []
    for path in sorted((ROOT / "inhouse").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if unit_of(module) != "scaleout":
            bad += [f"{module} imports {imp}" for imp in imports_of(path, module.rsplit(".", 1)[0])
                    if imp.split(".")[0] == "ray"]
    assert bad == []


def test_the_checker_catches_a_backward_import(tmp_path):
    (tmp_path / "inhouse" / "model").mkdir(parents=True)
    (tmp_path / "inhouse" / "model" / "bad.py").write_text("from inhouse.cli import app\n")
    (tmp_path / "inhouse" / "config.py").write_text("from .model import bad\n")
    rules = {"model": {"config"}, "config": set(), "cli": {"model"}}
    assert violations(rules, tmp_path) == ["inhouse.config imports inhouse.model",
                                           "inhouse.model.bad imports inhouse.cli"]
