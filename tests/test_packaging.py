"""The wheel, installed into a fresh venv, is a user's `strata` and nothing else.

It installs one import name (`strata`: no top-level `app`, `model`, `actors` or `placement` that
would shadow a user's own), carries every module of the source folders, and works from a
directory holding a user's own `app/` package: `from strata import LLM` and the `strata serve`
console script. The fresh venv sees the project's dependencies (a .pth file naming this venv's
site-packages) but not the project: .pth files inside that directory, such as the editable
install's hook, are not processed from there, so `strata` can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject.toml's [tool.setuptools.package-dir]).
SOURCE_FOLDERS = {"strata": "strata", "app": "strata/app", "actors": "strata/actors", "model": "strata/model",
                  "placement": "strata/placement"}
SERVE_FLAGS = ("--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend", "--port",
               "--api-key", "--served-model-name")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout: setuptools builds in the source tree (build/,
    strata.egg-info), which must not touch the checkout others work in."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".*_cache", ".whl", ".cache"))
    out = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        cwd=tmp)
    [built] = out.glob("strata-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps) and this venv's site-packages on its path."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], cwd=root.parent)
    return root


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A user's project: their own `app` package (and `model`, another name Strata once took)."""
    home = tmp_path_factory.mktemp("user")
    for name in ("app", "model"):
        (home / name).mkdir()
        (home / name / "__init__.py").write_text('MARKER = "user"\n')
    return home


def test_the_wheel_installs_only_strata(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"strata"}, sorted(top)
    [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["strata"]


def test_the_wheel_carries_every_module(wheel):
    """Every .py of the source folders, at its strata/ path (a package missing from pyproject's
    list would leave a hole)."""
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = set()
    for folder, package in SOURCE_FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder)
            if not any(part.startswith((".", "__pycache__")) for part in rel.parts):
                expected.add(f"{package}/{rel.as_posix()}")
    assert sorted(expected - in_wheel) == []
    assert sorted(in_wheel - expected) == []


def test_the_wheel_carries_the_kernel_tuning_table(wheel):
    assert "strata/model/kernels/attention_tiles.json" in zipfile.ZipFile(wheel).namelist()


def test_strata_comes_from_the_wheel_beside_a_users_app(venv, user_dir):
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=user_dir).stdout
    check = (
        "import app, model, strata, strata.app, strata.model\n"
        "from strata import LLM, SamplingParams\n"
        "assert app.MARKER == 'user' and model.MARKER == 'user', (app.__file__, model.__file__)\n"
        "print(strata.__file__); print(strata.app.__file__); print(strata.model.__file__)\n"
        "print(LLM.__module__, SamplingParams.__module__)\n"
    )
    lines = run([python, "-c", check], cwd=user_dir).stdout.split("\n")
    where = Path(site.strip()) / "strata"
    for line in lines[:3]:
        assert Path(line).is_relative_to(where), f"{line} is not the wheel's copy (under {where})"
        assert not Path(line).is_relative_to(REPO)
    assert lines[3] == "strata.app.llm strata.sampling_params"


def test_the_serve_console_script(venv, user_dir):
    done = run([str(venv / "bin" / "strata"), "serve", "--help"], cwd=user_dir)
    for flag in SERVE_FLAGS:
        assert flag in done.stdout, f"{flag} missing from `strata serve --help`:\n{done.stdout}"
