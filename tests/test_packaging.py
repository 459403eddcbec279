"""Packaging: what the sdist carries, the metadata, and the warning of an install without the
native extension.  scripts/check_sdist.sh (run by .ci/run) installs the sdist in a fresh venv;
these tests check the parts that need no install."""

import ast
import os
import re
import subprocess
import sys
import tarfile
import warnings

import pytest
import torch

import addax_kernels
from addax_kernels import ops
from addax_kernels.ops import _backend_choice
from addax_kernels.backends import native

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def test_version_has_one_source():
    """pyproject reads the version from addax_kernels.__version__ (statically: no import at
    build time) and states none of its own."""
    project = pyproject()
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "addax_kernels.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", addax_kernels.__version__)


def test_license_file_matches_the_declared_license():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO_ROOT, "LICENSE")) as handle:
        text = handle.read()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text


def test_supported_ranges_are_declared():
    """README: torch 2.11-2.13, triton 3.6-3.8 (the triton extra), Python 3.10+ (torch 2.11's floor)."""
    project = pyproject()["project"]
    assert "torch>=2.11,<2.14" in project["dependencies"]
    assert project["optional-dependencies"]["triton"] == ["triton>=3.6,<3.9"]
    assert project["requires-python"] == ">=3.10"


def _top_level_imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_test_extra_covers_what_the_suite_imports():
    project = pyproject()["project"]
    declared = {re.split(r"[<>=!\[ ;]", requirement)[0].lower()
                for requirement in project["dependencies"] + project["optional-dependencies"]["test"]}
    tests_dir = os.path.join(REPO_ROOT, "tests")
    local = {os.path.splitext(name)[0] for name in os.listdir(tests_dir)} | {"addax_kernels"}
    imported = set()
    for name in os.listdir(tests_dir):
        if name.endswith(".py"):
            imported |= _top_level_imports(os.path.join(tests_dir, name))
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name not in local}
    assert third_party - declared == set(), f"imported by the tests but not in the test extra: {third_party - declared}"


def test_sdist_carries_every_native_source(tmp_path):
    """setup.py compiles csrc/cpu/tile_kernels.cpp and csrc/cuda/*.cu outside the Extension's
    sources: the sdist must still carry every file under csrc/."""
    subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
         str(tmp_path)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
    )
    (sdist,) = tmp_path.glob("addax_kernels-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    on_disk = {
        os.path.relpath(os.path.join(folder, name), REPO_ROOT)
        for folder, _, names in os.walk(os.path.join(REPO_ROOT, "csrc"))
        for name in names
        if name.endswith((".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu"))
    }
    assert on_disk and on_disk <= members, f"missing from the sdist: {sorted(on_disk - members)}"
    for required in ("LICENSE", "setup.py", "pyproject.toml", "addax_kernels/__init__.py", "docs/native.md"):
        assert required in members, required


def test_auto_fallback_without_the_extension_warns_once_with_the_fix(monkeypatch):
    """An install without addax_kernels._C (a failed or skipped build): backend="auto" on the
    CPU falls back to the reference backend, warns once, saying why and how to fix it, and
    computes what the reference computes."""
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_IMPORT_ERROR", ImportError("cannot import name '_C' from 'addax_kernels'"))
    monkeypatch.setattr(_backend_choice, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(_backend_choice, "_RESOLVED", {})  # eager calls cache the backend per device
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    params = torch.zeros(3, 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            addax_kernels.perturb_(params, 7, 1e-3)
    fallback = [w for w in caught if "fell back to the pure-PyTorch reference backend" in str(w.message)]
    assert len(fallback) == 1 and fallback[0].category is RuntimeWarning
    message = str(fallback[0].message)
    for needed in ("native: the extension addax_kernels._C is not built", "cannot import name '_C'",
                   "ADDAX_KERNELS_REQUIRE_NATIVE=1 pip install --no-build-isolation --no-deps --force-reinstall",
                   "ADDAX_KERNELS_BACKEND=reference"):
        assert needed in message, needed
    expected = torch.zeros(3, 100)
    for _ in range(3):
        addax_kernels.perturb_(expected, 7, 1e-3, backend="reference")
    assert torch.equal(params, expected)
