"""The import rules of docs/architecture.md, checked on every CI run.

* import-linter's layers contract (pyproject.toml): each subpackage imports only the
  layers below it, so there are no cycles between subpackages;
* no private name (``_x``) is imported from another subpackage;
* production code (``chunkflow/``, ``scripts/``) never imports test code.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chunkflow"


def _subpackage(path: Path, root: Path) -> str:
    """``chunkflow.<sub>`` for a file under ``root/chunkflow``; ``scripts`` otherwise."""
    parts = path.relative_to(root).parts
    if parts[0] != "chunkflow":
        return parts[0]
    return "chunkflow." + Path(parts[1]).stem if len(parts) > 1 else "chunkflow"


def _imports(path: Path):
    """(line, imported module, imported names) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def private_cross_imports(files, root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        here = _subpackage(path, root)
        for line, module, names in _imports(path):
            if not module.startswith("chunkflow."):
                continue
            there = ".".join(module.split(".")[:2])
            private = [n for n in names + module.split(".") if n.startswith("_") and not n.startswith("__")]
            if private and there != here:
                bad.append(f"{path.relative_to(root)}:{line} imports {private} from {module}")
    return bad


def test_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the [dev] extra): pip install -e '.[dev]'")
    out = subprocess.run([exe, str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_no_private_names_cross_subpackages():
    files = list(PACKAGE.rglob("*.py")) + list((ROOT / "scripts").rglob("*.py"))
    assert private_cross_imports(files) == []


def test_the_private_name_check_can_fail(tmp_path):
    probe = tmp_path / "chunkflow" / "pipeline" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from chunkflow.scheduling.state import _Entry\n"
                     "from chunkflow.pipeline.plan import _p2p\n")  # same subpackage: allowed
    bad = private_cross_imports([probe], root=tmp_path)
    assert len(bad) == 1 and "_Entry" in bad[0]


def test_production_code_never_imports_tests():
    bad = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "scripts").rglob("*.py")):
        for line, module, _ in _imports(path):
            top = module.split(".")[0]
            if top in ("tests", "_workers", "conftest") or module.startswith("chunkflow.testing"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert bad == []
    assert not (PACKAGE / "testing").exists(), "the local launcher lives in chunkflow/parallel/spawn.py"
