"""The package: license, type marker, changelog, one version, and a wheel that
installs and imports in a clean virtual environment."""

import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from commands import run_ok
from packaging.version import Version

import sofo_jax

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
INIT = ROOT / "sofo_jax" / "__init__.py"
# Build and install steps are a few seconds each; the limit only stops a hang.
TIMEOUT_S = 300


def _build_unavailable():
  """Why the wheel cannot be built here without the network, or None."""
  try:
    import build  # noqa: F401  (the `build` front end, from the [test] extra)
  except ImportError:
    return 'needs the `build` package: pip install -e ".[test]"'
  setuptools_version = Version(importlib.metadata.version("setuptools"))
  # Without isolation the backend is this environment's setuptools, which
  # reads the SPDX `license` string from 77 on.
  if setuptools_version < Version("77"):
    return (
      f"setuptools {setuptools_version} cannot read the SPDX license string: "
      'pip install -e ".[test]"'
    )
  return None


_WHY_NO_BUILD = _build_unavailable()
needs_build = pytest.mark.skipif(_WHY_NO_BUILD is not None, reason=str(_WHY_NO_BUILD))


def test_license_is_the_declared_apache_2():
  text = (ROOT / "LICENSE").read_text()
  for phrase in (
    "Apache License",
    "Version 2.0, January 2004",
    "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
    "END OF TERMS AND CONDITIONS",
  ):
    assert phrase in text, phrase
  assert PYPROJECT["project"]["license"] == "Apache-2.0"
  assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_py_typed_and_changelog_exist():
  assert (ROOT / "sofo_jax" / "py.typed").is_file()
  assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["sofo_jax"]
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert changelog.startswith("# Changelog")
  assert "## [Unreleased]" in changelog
  assert "### Added" in changelog


def test_version_has_one_source():
  project = PYPROJECT["project"]
  assert "version" not in project, "pyproject.toml must not repeat the version"
  assert "version" in project["dynamic"]
  dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
  assert dynamic == {"attr": "sofo_jax.__version__"}
  # setuptools reads the attribute without importing the package (and so
  # jax) only when it is a plain string literal at module level.
  assignments = [
    node
    for node in ast.parse(INIT.read_text()).body
    if isinstance(node, ast.Assign)
    and any(getattr(target, "id", None) == "__version__" for target in node.targets)
  ]
  assert len(assignments) == 1
  value = assignments[0].value
  assert isinstance(value, ast.Constant) and isinstance(value.value, str)
  assert value.value == sofo_jax.__version__
  Version(sofo_jax.__version__)  # a valid PEP 440 version, or InvalidVersion
  elsewhere = [
    path
    for path in (ROOT / "sofo_jax").rglob("*.py")
    if path != INIT and "__version__ =" in path.read_text()
  ]
  assert not elsewhere, elsewhere


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel `python -m build` makes from a copy of the source tree."""
  work = tmp_path_factory.mktemp("packaging")
  # A copy, so that no stale build/ directory of the checkout (holding
  # modules since removed) can leak into the wheel, and the checkout stays
  # untouched while other tests run.
  source = work / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy2(ROOT / name, source / name)
  shutil.copytree(
    ROOT / "sofo_jax",
    source / "sofo_jax",
    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
  )
  # A jax that cannot be imported: the build fails if reading the version
  # falls back to importing sofo_jax.
  poison = work / "poison" / "jax"
  poison.mkdir(parents=True)
  (poison / "__init__.py").write_text(
    'raise ImportError("building sofo_jax imported jax")\n'
  )
  env = {**os.environ, "PYTHONPATH": str(poison.parent)}
  dist = work / "dist"
  run_ok(
    [
      sys.executable,
      "-m",
      "build",
      "--wheel",
      "--no-isolation",
      "--outdir",
      str(dist),
      str(source),
    ],
    env=env,
    cwd=work,
    timeout=TIMEOUT_S,
  )
  wheels = sorted(dist.glob("*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@needs_build
def test_wheel_contents(wheel):
  version = sofo_jax.__version__
  assert wheel.name == f"sofo_jax-{version}-py3-none-any.whl"
  dist_info = f"sofo_jax-{version}.dist-info"
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    licenses = [
      name
      for name in (f"{dist_info}/licenses/LICENSE", f"{dist_info}/LICENSE")
      if name in names
    ]
    assert licenses, sorted(name for name in names if name.startswith(dist_info))
    assert archive.read(licenses[0]).decode() == (ROOT / "LICENSE").read_text()
  assert "sofo_jax/py.typed" in names
  # Every module of the source tree ships, and nothing but the package does.
  modules = {
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "sofo_jax").rglob("*.py")
    if "__pycache__" not in path.parts
  }
  assert modules == {name for name in names if name.endswith(".py")}
  assert all(name.split("/")[0] in ("sofo_jax", dist_info) for name in names), names
  headers = metadata.split("\n\n", 1)[0].splitlines()
  assert f"Version: {version}" in headers
  assert "License-File: LICENSE" in headers
  assert "License-Expression: Apache-2.0" in headers


# Runs in the clean environment's interpreter: finds sofo_jax there first, then
# borrows this environment's site-packages for the dependencies only.
_IMPORT_CHECK = """
import importlib.metadata, importlib.util, json, sys
spec = importlib.util.find_spec("sofo_jax")
found = {"origin": spec and spec.origin, "prefix": sys.prefix,
         "version_metadata": importlib.metadata.version("sofo_jax")}
sys.path.extend(json.loads(sys.argv[1]))  # appended: cannot shadow the wheel
import pathlib, sofo_jax
found.update(file=sofo_jax.__file__, version=sofo_jax.__version__,
             py_typed=pathlib.Path(sofo_jax.__file__).with_name("py.typed").is_file(),
             missing=[name for name in sofo_jax.__all__ if not hasattr(sofo_jax, name)])
print(json.dumps(found))
"""


@needs_build
def test_wheel_installs_and_imports_in_a_clean_venv(wheel, tmp_path):
  venv = tmp_path / "venv"
  created = subprocess.run(
    [sys.executable, "-m", "venv", str(venv)],
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  if created.returncode != 0:
    pytest.skip(f"cannot create a virtual environment: {created.stderr[-500:]}")
  python = venv / "bin" / "python"
  if not python.exists():  # Windows layout
    python = venv / "Scripts" / "python.exe"
  # --isolated: no PIP_* variables or user configuration; --no-index: the
  # wheel alone, nothing from a registry.
  run_ok(
    [
      str(python),
      "-m",
      "pip",
      "install",
      "--isolated",
      "--no-index",
      "--no-deps",
      "--disable-pip-version-check",
      "--quiet",
      str(wheel),
    ],
    cwd=tmp_path,
    timeout=TIMEOUT_S,
  )

  dependencies = [path for path in site.getsitepackages() if Path(path).is_dir()]
  # -I: no PYTHONPATH, no user site and no working directory on sys.path,
  # so the checkout's sofo_jax cannot be picked up by accident.
  ran = run_ok(
    [str(python), "-I", "-c", _IMPORT_CHECK, json.dumps(dependencies)],
    cwd=tmp_path,
    timeout=TIMEOUT_S,
  )
  found = json.loads(ran.stdout.strip().splitlines()[-1])
  clean = venv.resolve()
  assert Path(found["prefix"]).resolve() == clean
  assert found["origin"] is not None, "sofo_jax is not importable from the clean venv"
  assert Path(found["origin"]).resolve().is_relative_to(clean), found["origin"]
  assert Path(found["file"]).resolve().is_relative_to(clean), found["file"]
  assert found["version"] == found["version_metadata"] == sofo_jax.__version__
  assert found["py_typed"]
  assert found["missing"] == []
