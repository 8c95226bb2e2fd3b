"""A non-editable install (``pip install .``) carries the configs and runs a command anywhere."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_config_and_a_command_runs_outside_the_checkout(tmp_path):
    # what a source distribution holds, copied (links kept), so no build/ left in the checkout is reused
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("prior", "conf"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation uses this environment's setuptools (no download) when it has one
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("prior-*.whl"))
    packaged = {n.removeprefix("prior/conf/") for n in zipfile.ZipFile(wheel).namelist() if n.startswith("prior/conf/")}
    configs = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and packaged == configs

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "1"}
    # the installed copy, not the checkout, and Hydra prints the composed job config and exits
    done = subprocess.run(
        [sys.executable, "-c", "import prior, sys; print(prior.__file__); from prior.cli.train_lvlm import main; "
         "sys.argv = ['prior-train-lvlm', '--cfg', 'job', '--resolve', 'loss=ntp']; main()"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith(str(site))
    assert "name: ntp" in done.stdout and f"root_dir: {elsewhere}" in done.stdout
