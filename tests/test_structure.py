"""The tree's shape: no import cycles, no stage importing a later stage, a CLI that starts with only the core."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "trajdata"

# Stages in pipeline order; a module may import only its own rank or lower ones.
RANKS = {
    "errors": 0, "config": 0, "__init__": 0,
    "format": 1,
    "envs": 2,
    "collectors": 3, "importers": 3,
    "loaders": 4,
    "models": 5,
    "train": 6,
    "evaluate": 7,
    "scaling": 8, "sweep": 8, "rl": 8,
    "cli": 9,
}
CORE_BLOCKED = ("gymnasium", "nle", "torch", "scipy", "pandas", "matplotlib", "ale_py", "stable_baselines3", "ray",
                "cv2", "statsmodels", "tensorboard")


def _modules() -> dict[str, Path]:
    return {".".join(("trajdata", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}


def _imports(path: Path, module: str, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module, names) of each trajdata import in ``path`` (also those inside functions unless ``top_level_only``)."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = []
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return [(m, names) for m, names in out if m.startswith("trajdata")]


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the trajdata modules it imports (``from pkg import submodule`` counts as the submodule)."""
    mods = _modules()
    g = {}
    for m, p in mods.items():
        deps = set()
        for base, names in _imports(p, m, top_level_only):
            subs = {f"{base}.{n}" for n in names} & mods.keys()
            deps |= subs if subs and len(subs) == len(names) else {base} | subs
        g[m] = {d for d in deps if d in mods and d != m}
    return g


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_every_stage_has_a_rank():
    assert {_stage(m) for m in _modules()} <= set(RANKS), set(map(_stage, _modules())) - set(RANKS)


def test_no_module_level_import_cycles():
    assert find_cycle(_graph(top_level_only=True)) is None


def test_no_import_cycles_between_stages_even_lazily():
    stages = {}
    for m, deps in _graph(top_level_only=False).items():
        stages.setdefault(_stage(m), set()).update(_stage(d) for d in deps if _stage(d) != _stage(m))
    for s in RANKS:
        stages.setdefault(s, set())
    assert find_cycle(stages) is None


def test_no_stage_imports_a_later_stage():
    bad = [f"{m} -> {d}" for m, deps in _graph(top_level_only=False).items() for d in deps
           if RANKS[_stage(d)] > RANKS[_stage(m)]]
    assert not bad, bad


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert RANKS["format"] < RANKS["envs"] < RANKS["collectors"] < RANKS["loaders"] < RANKS["train"] \
        < RANKS["evaluate"] < RANKS["scaling"] < RANKS["cli"]


def test_registry_help_is_each_commands_own_help():
    from trajdata.cli.main import COMMANDS, LazyGroup, cli
    import click

    def walk(entries, path):
        for name, e in entries.items():
            if isinstance(e[1], dict):
                yield from walk(e[1], path + [name])
            else:
                yield path + [name], e

    n = 0
    for path, (target, short, _) in walk(COMMANDS, []):
        ctx = click.Context(cli, info_name="trajdata")
        cmd = cli
        for p in path:
            cmd = cmd.get_command(ctx, p)
            ctx = click.Context(cmd, info_name=p, parent=ctx)
        assert not isinstance(cmd, LazyGroup)
        assert cmd.get_short_help_str(limit=1000) == short, path
        n += 1
    assert n >= 14


_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Block())
sys.argv = ["trajdata", *sys.argv[1:]]
from trajdata.cli.main import cli
cli()
"""


def _core_only(*args):
    code = _BLOCKER.format(blocked=set(CORE_BLOCKED))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_core_only_install_runs_the_dataset_commands(scripted_data):
    tiny_nethack = scripted_data
    r = _core_only("--help")
    assert r.returncode == 0 and "collect" in r.stdout and "scaling" in r.stdout, r.stderr
    for args in (["inspect", tiny_nethack], ["verify", tiny_nethack], ["index", tiny_nethack],
                 ["show", tiny_nethack, "--episode", "000000-0000", "--step", 5, "--no-color"],
                 ["collect", "--help"], ["scaling", "--help"]):
        r = _core_only(*args)
        assert r.returncode == 0, (args, r.stderr)
    assert "episodes 6" in _core_only("inspect", tiny_nethack).stdout


@pytest.mark.parametrize("args, extra", [
    (["collect", "scripted", "--out", "x"], "nethack"),
    (["scaling", "fit", "runs.csv", "--out", "x"], "scaling"),
    (["train", "ppo", "--game", "Breakout"], "train"),
])
def test_core_only_missing_extra_is_one_line(args, extra, tmp_path):
    r = _core_only(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("trajdata: error:") and f"trajdata[{extra}" in lines[0], lines[0]


def test_import_nld_module_needs_no_torch():
    code = ("import sys\nclass B:\n def find_spec(self, n, p=None, t=None):\n"
            "  if n.split('.')[0] == 'torch': raise ModuleNotFoundError(n)\n"
            "sys.meta_path.insert(0, B())\nimport trajdata.importers.nld, trajdata.cli.importers\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
