"""Source audit: nothing under src/ deserialises a file in a way that can run code.

A checkpoint, a weights file or a YAML config may come from someone else (a shared run directory,
a downloaded model). `torch.load` without `weights_only=True` unpickles, and unpickling runs code;
so do `pickle.load`, `yaml.load` with an unsafe loader, `marshal` and `shelve`. The audit reads
the source with `ast`, so a new call anywhere in the package fails this test, naming file and line.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "wbs_dist"

# module -> functions that must never be called (they deserialise with code execution).
FORBIDDEN = {
    "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "dill": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "joblib": {"load"},
    "marshal": {"load", "loads"},
    "shelve": {"open", "Shelf", "DbfilenameShelf"},
    "yaml": {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
             "Loader", "UnsafeLoader", "FullLoader"},
}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for every call (or import) that can deserialise code."""
    tree = ast.parse(source, filename)
    modules: dict[str, str] = {}    # local name -> module (import torch as th; import yaml)
    names: dict[str, str] = {}      # local name -> module.function (from torch import load)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[(a.asname or a.name).split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module.split('.')[0]}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module.split(".")[0]
            for a in node.names:
                if a.name in FORBIDDEN.get(mod, ()):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules:
            qual = f"{modules[func.value.id]}.{func.attr}"
        elif isinstance(func, ast.Name) and func.id in names:
            qual = names[func.id]
        else:
            continue
        mod, _, fn = qual.partition(".")
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if fn in FORBIDDEN.get(mod, ()):
            found.append(f"{filename}:{node.lineno}: {qual}(...)")
        elif qual == "torch.load" and not _is_true(kw.get("weights_only")):
            found.append(f"{filename}:{node.lineno}: torch.load(...) without weights_only=True")
        elif qual == "numpy.load" and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append(f"{filename}:{node.lineno}: numpy.load(..., allow_pickle=...)")
    return found


def test_no_code_runs_when_a_file_is_loaded():
    """Every torch.load passes weights_only=True, every YAML read is yaml.safe_load, and there is no
    pickle/marshal/shelve load anywhere in src/."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(SRC.parent)))]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load(path)",
    "import torch\nstate = torch.load(path, weights_only=False)",
    "import torch as th\nstate = th.load(path, map_location='cpu')",
    "from torch import load\nstate = load(path)",
    "import yaml\ncfg = yaml.load(text)",
    "import yaml\ncfg = yaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\ncfg = yaml.unsafe_load(text)",
    "from yaml import unsafe_load",
    "import pickle\nobj = pickle.load(fh)",
    "import pickle as p\nobj = p.loads(data)",
    "from pickle import loads",
    "import numpy as np\na = np.load(path, allow_pickle=True)",
    "import marshal\ncode = marshal.loads(data)",
])
def test_the_audit_catches_each_unsafe_form(snippet):
    """The audit itself: each form it must catch (the source is clean, so this is what shows the
    first test would fail if one were added)."""
    assert unsafe_loads(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)",
    "import yaml\ncfg = yaml.safe_load(text)\nout = yaml.safe_dump(cfg)",
    "import numpy as np\na = np.load(path, mmap_mode='r')",
    "import pickle\ndata = pickle.dumps(obj)",
])
def test_the_audit_passes_the_safe_forms(snippet):
    assert unsafe_loads(snippet) == []
