"""The package is laid out as its pipeline: one home per concept, data flowing one way.

These tests read the source, not behaviour: they keep the layout from drifting back into stages that
reach into each other or contracts copied into several modules.
"""

import ast
import re
from pathlib import Path

import pytest

from wbs_dist import schema

SRC = Path(__file__).resolve().parents[1] / "src" / "wbs_dist"
MODULES = sorted(p for p in SRC.rglob("*.py"))

# Where each part of the package may import from (besides itself and the standard library).
SHARED = {"errors", "schema", "atomic", "config", "preprocess", "lock", "scratch", "detection", "finder"}
ALLOWED = {
    "shared": SHARED,
    "data": SHARED | {"data"},
    "synth": SHARED | {"synth"},
    "train": SHARED | {"data", "train"},
    "evaluate": SHARED | {"evaluate"},
    "infer": SHARED | {"data", "train", "infer"},
    "launch": SHARED | {"data", "train", "evaluate", "infer", "launch"},   # cv's report: the finder's point
}


def _part(path: Path) -> str | None:
    rel = path.relative_to(SRC)
    if len(rel.parts) > 1:
        return rel.parts[0]
    name = rel.stem
    return "shared" if name in SHARED else None          # cli, cli_parser, demo, __init__: may import anything


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wbs_dist"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("wbs_dist"):
                    yield a.name, []


def _target(module: str, name: str) -> str:
    """The part of the package `from module import name` reaches."""
    parts = module.split(".")[1:]
    if not parts:
        parts = [name]
    return parts[0] if parts[0] not in SHARED else "shared"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_data_flows_one_way(path):
    part = _part(path)
    if part is None:
        return
    allowed = {"shared" if p in SHARED else p for p in ALLOWED[part]}
    for module, names in _imports(path):
        for name in names or [""]:
            target = _target(module, name)
            assert target in allowed, f"{path.relative_to(SRC)} imports {module} {name}: {part} may not use {target}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_private_name_of_another(path):
    for module, names in _imports(path):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{path.relative_to(SRC)} imports private {private} from {module}"


def test_score_shares_study_reading_with_ingest_but_imports_nothing_from_it():
    for path in (SRC / "infer").glob("*.py"):
        assert all(m != "wbs_dist.data.ingest" for m, _ in _imports(path)), path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(SRC)}: split it by concern"


CONTRACT_LITERALS = [schema.ANTERIOR, schema.POSTERIOR, schema.MALIGNANT, schema.BENIGN, schema.LUNG,
                     schema.PROSTATE, schema.BREAST, schema.FEW, schema.MEDIUM, schema.EXTENSIVE]


@pytest.mark.parametrize("literal", CONTRACT_LITERALS)
def test_each_contract_literal_is_defined_once(literal):
    """A grep for a view, label, tumour type or burden group finds it in schema.py only (as a string
    in code; prose in comments and docstrings may name it)."""
    found = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == literal and id(node) not in docstrings:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found and all(f.startswith("schema.py:") for f in found), found


def test_prediction_columns_are_defined_once():
    text = "\n".join(p.read_text() for p in MODULES if p.name != "schema.py")
    assert not re.search(r"\"patient_id\",\s*\"study_uid\",\s*\"lesion_id\"", text)
