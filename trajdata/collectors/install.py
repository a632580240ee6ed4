"""Fetch third-party experts' source (pinned) into trajdata's cache and install their PyPI needs.

AutoAscend has no setup.py, so `pip install git+URL` cannot work: we extract the pinned commit with
`git archive` into `$TRAJDATA_CACHE/experts/autoascend-<commit>` (default cache `~/.cache/trajdata`)
and put that directory on `sys.path` when the expert is imported. Its code is never vendored here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from trajdata.errors import ExpertError

AUTOASCEND_URL = "https://github.com/maciej-sypetkowski/autoascend"
AUTOASCEND_COMMIT = "8527910"
# (PyPI name, import name); the `autoascend` extra in pyproject.toml lists the same packages.
AUTOASCEND_REQUIREMENTS = [
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("numba", "numba"),
    ("opencv-python-headless", "cv2"),
    ("nltk", "nltk"),
    ("toolz", "toolz"),
    ("matplotlib", "matplotlib"),
    ("seaborn", "seaborn"),
]
MARKER = ".trajdata-install.json"


def cache_dir() -> Path:
    return Path(os.environ.get("TRAJDATA_CACHE") or Path.home() / ".cache" / "trajdata")


def autoascend_dir(commit: str = AUTOASCEND_COMMIT) -> Path:
    return cache_dir() / "experts" / f"autoascend-{commit}"


def installed_path(commit: str = AUTOASCEND_COMMIT) -> Path | None:
    """The installed AutoAscend source directory, or None."""
    d = autoascend_dir(commit)
    return d if (d / MARKER).is_file() and (d / "autoascend" / "agent.py").is_file() else None


def _git(*args: str, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], check=True, capture_output=True, **kw)
    except FileNotFoundError as e:
        raise ExpertError("git is not installed; it is needed to fetch AutoAscend") from e
    except subprocess.CalledProcessError as e:
        msg = e.stderr.decode(errors="replace").strip().splitlines()
        raise ExpertError(f"git {args[0]} failed: {msg[-1] if msg else e}") from e


def _git_dir(path: Path) -> Path | None:
    """The git directory of a bare repository or of a checkout at `path`, if it is one."""
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path
    if (path / ".git").exists():
        return path / ".git"
    return None


def _extract(git_dir: Path, commit: str, dest: Path) -> None:
    archive = _git("--git-dir", str(git_dir), "archive", "--format=tar", commit)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def fetch_source(source: str | os.PathLike | None, dest: Path, commit: str = AUTOASCEND_COMMIT) -> None:
    """Put the files of `commit` from `source` (git URL, bare git dir, or checkout) into `dest`."""
    dest.mkdir(parents=True)
    src = str(source) if source is not None else AUTOASCEND_URL
    local = Path(src).expanduser()
    if local.exists():
        git_dir = _git_dir(local)
        if git_dir is None:
            raise ExpertError(f"{src} is not a git repository (need a clone or bare mirror of AutoAscend)")
        _extract(git_dir, commit, dest)
        return
    with tempfile.TemporaryDirectory(prefix="trajdata-clone-") as tmp:
        _git("clone", "--quiet", "--no-checkout", src, tmp)
        _extract(Path(tmp) / ".git", commit, dest)


def missing_requirements() -> list[str]:
    return [pkg for pkg, mod in AUTOASCEND_REQUIREMENTS if importlib.util.find_spec(mod) is None]


def pip_install(packages: list[str]) -> None:
    if packages:
        subprocess.run([sys.executable, "-m", "pip", "install", *packages], check=True)


def install_autoascend(source: str | os.PathLike | None = None, *, force: bool = False,
                       deps: bool = True, warm: bool = True, commit: str = AUTOASCEND_COMMIT) -> Path:
    """Install AutoAscend at `commit` into the cache (idempotent); returns its directory."""
    dest = autoascend_dir(commit)
    if installed_path(commit) is not None and not force:
        if deps:
            pip_install(missing_requirements())
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        fetch_source(source, tmp / "src", commit)
        if not (tmp / "src" / "autoascend" / "agent.py").is_file():
            raise ExpertError(f"commit {commit} of {source or AUTOASCEND_URL} has no autoascend/agent.py")
        info = {"commit": commit, "source": str(source or AUTOASCEND_URL)}
        (tmp / "src" / MARKER).write_text(json.dumps(info) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        (tmp / "src").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if deps:
        pip_install(missing_requirements())
    if warm and not missing_requirements():
        warm_up(dest)
    return dest


def warm_up(path: Path) -> None:
    """Import AutoAscend once so numba writes its compile cache next to the source."""
    code = "import sys, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, sys.argv[1]); import autoascend.agent"
    env = dict(os.environ, MPLBACKEND="Agg")
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, env=env, capture_output=True)
