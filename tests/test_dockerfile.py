"""The Dockerfile, checked without a container registry (none is reachable here).

* its base image is pinned to a tag whose Python and torch we know from NVIDIA's release
  notes (NGC below), and those satisfy pyproject.toml and megatron-core;
* its pins agree with pyproject.toml (megatron-core, the GPU extras, chunkflow's own
  dependencies with the same bounds);
* pip can never replace the image's torch: no pip step names torch, megatron-core and
  the project go in with --no-deps, megatron-core's other requirements are listed;
* its pip steps resolve (``pip install --dry-run`` for the image's Python, never
  downloading torch). Skipped only when the package index cannot be reached.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# NGC PyTorch tags -> (Python, torch) from each release's notes. Bumping the base image
# means adding its line here from the notes, so the checks below see the new versions.
NGC = {
    "25.12": ("3.12", "2.10.0a0+b4e4ee81d3"),
}
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "Max retries exceeded", "ConnectTimeoutError", "ReadTimeoutError")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in instructions() if op == "ARG" and "=" in rest)


def pip_installs() -> list[list[str]]:
    """The argument lists of every ``pip install`` in a RUN, ARGs substituted."""
    found = []
    for op, rest in instructions():
        if op != "RUN":
            continue
        for part in re.split(r"&&|\|\|", rest):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                subst = [re.sub(r"\$\{(\w+)\}", lambda m: args()[m.group(1)], w) for w in words[2:]]
                found.append(subst)
    return found


def requirements(words: list[str]) -> list[Requirement]:
    return [Requirement(w) for w in words if not w.startswith("-") and w != "."]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def base_image() -> tuple[str, str, str]:
    (ref,) = [rest for op, rest in instructions() if op == "FROM"]
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d\.\d\d)-py3", ref)
    assert m, f"FROM {ref}: expected a pinned NGC PyTorch tag, nvcr.io/nvidia/pytorch:YY.MM-py3"
    assert m.group(1) in NGC, f"base image {ref}: add its Python and torch (release notes) to NGC in this test"
    return (m.group(1), *NGC[m.group(1)])


def test_base_image_is_pinned_and_its_python_and_torch_fit():
    _, python, torch = base_image()
    proj = pyproject()
    assert Version(python) in SpecifierSet(proj["requires-python"])
    (torch_req,) = [Requirement(d) for d in proj["dependencies"] if Requirement(d).name == "torch"]
    assert torch_req.specifier.contains(torch, prereleases=True), (torch_req, torch)


def test_pins_agree_with_pyproject():
    proj = pyproject()
    deps = {canonicalize_name(Requirement(d).name): Requirement(d) for d in proj["dependencies"]}
    pinned = {canonicalize_name(r.name): r for words in pip_installs() for r in requirements(words)}

    mcore = pinned["megatron-core"]
    (version,) = [s.version for s in mcore.specifier if s.operator == "=="]
    assert deps["megatron-core"].specifier.contains(version), (mcore, deps["megatron-core"])

    gpu = {canonicalize_name(Requirement(d).name): Requirement(d) for d in proj["optional-dependencies"]["gpu"]}
    for name in ("transformer-engine", "flash-attn"):
        (v,) = [s.version for s in pinned[name].specifier if s.operator == "=="]
        assert gpu[name].specifier.contains(v), (pinned[name], gpu[name])

    # chunkflow's own dependencies, minus the two the image and the pin above provide,
    # with exactly pyproject's bounds
    own = {n: str(r) for n, r in deps.items() if n not in ("torch", "megatron-core")}
    listed = {n: str(r) for n, r in pinned.items() if n in own}
    assert listed == own


def test_pip_cannot_replace_the_images_torch():
    installs = pip_installs()
    for words in installs:
        assert "torch" not in {canonicalize_name(r.name) for r in requirements(words)}, words
        names = {canonicalize_name(r.name) for r in requirements(words)}
        if "megatron-core" in names or "." in words:
            assert "--no-deps" in words, words
    assert any("." in w and "--no-deps" in w for w in installs), "the project is installed with --no-deps"
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "diff /tmp/torch-version" in runs  # the build fails if torch changed anyway


def _pip(*argv: str, tmp: Path) -> dict:
    report = tmp / f"report-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "--target", str(tmp / "target"), *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    if out.returncode != 0:
        if any(e in out.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"the package index is unreachable: {out.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"{' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(report.read_text())


def test_pip_steps_resolve_for_the_images_python(tmp_path):
    _, python, torch = base_image()
    for_image = ["--python-version", python, "--only-binary=:all:", "--ignore-requires-python"]
    installs = pip_installs()

    (mcore_step,) = [w for w in installs if "megatron-core" in {canonicalize_name(r.name) for r in requirements(w)}]
    (mcore,) = _pip(*for_image, *mcore_step, tmp=tmp_path)["install"]
    meta = mcore["metadata"]
    assert Version(python) in SpecifierSet(meta["requires_python"]), meta["requires_python"]
    needs = [Requirement(r) for r in meta["requires_dist"] if "extra ==" not in r]
    torch_req = [r for r in needs if r.name == "torch"]
    assert torch_req and torch_req[0].specifier.contains(torch, prereleases=True), torch_req
    listed = {canonicalize_name(r.name) for w in installs for r in requirements(w)}
    assert {canonicalize_name(r.name) for r in needs} - {"torch"} <= listed  # --no-deps loses nothing

    (deps_step,) = [w for w in installs if "pyyaml" in {canonicalize_name(r.name) for r in requirements(w)}]
    resolved = _pip(*for_image, *deps_step, tmp=tmp_path)["install"]
    assert "torch" not in {canonicalize_name(i["metadata"]["name"]) for i in resolved}

    (project_step,) = [w for w in installs if "." in w]
    (proj,) = _pip(*project_step, tmp=tmp_path)["install"]
    assert proj["metadata"]["name"] == "chunkflow-megatron"

    for name in ("transformer-engine", "flash-attn"):  # fallbacks: the pinned release exists
        (req,) = [r for w in installs for r in requirements(w) if canonicalize_name(r.name) == name]
        (version,) = [s.version for s in req.specifier]
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and re.search(rf"[ ,]{re.escape(version)}(,|$)", out.stdout, re.M), out
