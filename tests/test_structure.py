"""The tree's shape: no import cycles (counting imports inside functions and modules named in
strings), each stage importing only earlier stages, no module reaching into another's private
names, no function over 80 lines, and a CLI that starts with only the core. Every check is also run
on a small tree that breaks it, to show that it can fail.

``python tests/test_structure.py`` prints the stage graph (stages in pipeline order, each with the
stages it imports) and ``--modules`` the module graph.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "trajdata"

# Stages in pipeline order: a module may import its own stage and earlier ones, never a later one.
STAGES = ("__init__", "errors", "config", "format", "envs", "collectors", "importers", "packs", "loaders", "exporters", "models",
          "train", "evaluate", "rl", "scaling", "sweep", "cli")
RANKS = {s: i for i, s in enumerate(STAGES)}
MAX_FUNCTION_LINES = 80
CORE_BLOCKED = ("gymnasium", "nle", "torch", "scipy", "pandas", "matplotlib", "ale_py", "stable_baselines3", "ray",
                "cv2", "statsmodels", "tensorboard")
_TARGET = re.compile(r"^(\w+(?:\.\w+)+):\w+$")  # "module:Name", as the lazy CLI and ExpertSpec name them


# ---- reading a tree ------------------------------------------------------------------------------

def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file under ``root`` (a package directory)."""
    pkg = root.name
    return {".".join((pkg, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(root.rglob("*.py"))}


def imports(path: Path, module: str, pkg: str = "trajdata") -> list[tuple[str, list[str]]]:
    """(module, names) of every import of ``pkg`` in ``path``: at module level, inside functions,
    and modules named in strings (``"trajdata.x.y:Name"``, ``import_module("trajdata.x")``)."""
    tree = ast.parse(path.read_text())
    loaded = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", ""))
              in ("import_module", "__import__") for a in n.args[:1]}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _TARGET.match(node.value)
            if m or id(node) in loaded:
                out.append((m.group(1) if m else node.value, []))
    return [(m, names) for m, names in out if m == pkg or m.startswith(pkg + ".")]


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports (``from pkg import submodule`` counts as the submodule)."""
    mods = modules(root)
    g = {}
    for m, p in mods.items():
        deps = set()
        for base, names in imports(p, m, root.name):
            subs = {f"{base}.{n}" for n in names} & mods.keys()
            deps |= subs if subs and len(subs) == len(names) else {base} | subs
        g[m] = {d for d in deps if d in mods and d != m}
    return g


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def stage_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in g.items():
        out.setdefault(stage(m), set()).update(stage(d) for d in deps if stage(d) != stage(m))
    return out


# ---- the checks ------------------------------------------------------------------------------------

def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
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


def later_stage_imports(g: dict[str, set[str]], ranks: dict[str, int]) -> list[str]:
    """``module -> module`` arrows into a later stage, or into another stage of the same rank."""
    return [f"{m} -> {d}" for m, deps in sorted(g.items()) for d in sorted(deps)
            if stage(d) != stage(m) and ranks[stage(d)] >= ranks[stage(m)]]


def unranked(g: dict[str, set[str]], ranks: dict[str, int]) -> set[str]:
    return {stage(m) for m in g} - set(ranks)


def private_reaches(root: Path = ROOT) -> list[str]:
    """Uses of another module's private names: ``from pkg.x import _name`` or ``x._name`` where ``x``
    is an imported module of the tree."""
    mods, pkg, bad = modules(root), root.name, []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and (node.module == pkg or node.module.startswith(pkg + ".")):
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif _private(a.name) and node.module != m:
                        bad.append(f"{m}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, m) != m):
                bad.append(f"{m}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (and methods) longer than ``limit`` lines, with their lengths."""
    out = []
    for m, p in modules(root).items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{m}.{node.name}: {n} lines")
    return out


# ---- the tree --------------------------------------------------------------------------------------

def test_every_stage_has_a_rank():
    assert not unranked(graph(), RANKS)


def test_no_import_cycles_between_modules_even_lazily():
    assert find_cycle(graph()) is None


def test_no_stage_imports_a_later_or_same_rank_stage():
    bad = later_stage_imports(graph(), RANKS)
    assert not bad, bad


def test_no_module_reaches_into_anothers_private_names():
    bad = private_reaches()
    assert not bad, bad


def test_no_function_over_80_lines():
    bad = long_functions()
    assert not bad, bad


def test_the_graph_sees_lazy_and_string_imports():
    g = graph()
    assert "trajdata.collectors.nethack" in g["trajdata.collectors.config"]  # "module:Class" in EXPERTS
    assert "trajdata.cli.train" in g["trajdata.cli.main"]  # the lazy command table
    assert "trajdata.train.bc" in g["trajdata.sweep.plan"]  # imported inside a function


# ---- each check fails on a tree that breaks it -----------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "trajdata"
    for name, text in {"__init__.py": "", **files}.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_a_lazy_cycle_between_modules_is_found(tmp_path):
    root = _tree(tmp_path, {"sweep/__init__.py": "", "sweep/run.py": "from trajdata.sweep.plan import x\n",
                            "sweep/plan.py": "def f():\n    from trajdata.sweep.run import y\n"})
    assert find_cycle(graph(root)) == ["trajdata.sweep.plan", "trajdata.sweep.run", "trajdata.sweep.plan"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_string_import_is_an_arrow(tmp_path):
    root = _tree(tmp_path, {"format/__init__.py": "", "cli/__init__.py": "", "cli/main.py": "", "cli/other.py": "",
                            "format/x.py": "TABLE = {'show': 'trajdata.cli.main:show'}\n",
                            "format/y.py": "import importlib\nimportlib.import_module('trajdata.cli.other')\n",
                            "format/z.py": "ARGV = ['python', '-m', 'trajdata.cli']  # a command, not an import\n"})
    assert later_stage_imports(graph(root), RANKS) == ["trajdata.format.x -> trajdata.cli.main",
                                                       "trajdata.format.y -> trajdata.cli.other"]


def test_an_import_of_a_later_or_same_rank_stage_is_found(tmp_path):
    root = _tree(tmp_path, {"format/__init__.py": "", "train/__init__.py": "", "loaders/__init__.py": "",
                            "format/a.py": "import trajdata.train.b\n", "train/b.py": "",
                            "loaders/c.py": "from trajdata.format import a\n"})
    assert later_stage_imports(graph(root), RANKS) == ["trajdata.format.a -> trajdata.train.b"]
    same = dict(RANKS, loaders=RANKS["format"])
    assert later_stage_imports(graph(root), same) == ["trajdata.format.a -> trajdata.train.b",
                                                      "trajdata.loaders.c -> trajdata.format.a"]
    assert unranked(graph(_tree(tmp_path / "u", {"extra/__init__.py": ""})), RANKS) == {"extra"}


def test_a_private_reach_is_found(tmp_path):
    root = _tree(tmp_path, {"format/__init__.py": "", "format/codec.py": "def _needed():\n    pass\n",
                            "loaders/__init__.py": "",
                            "loaders/stream.py": "from trajdata.format import codec\ncodec._needed()\n",
                            "loaders/other.py": "from trajdata.format.codec import _needed\n",
                            "loaders/fine.py": "from trajdata.format import codec\ncodec.__name__\n"})
    assert private_reaches(root) == ["trajdata.loaders.other: from trajdata.format.codec import _needed",
                                     "trajdata.loaders.stream: codec._needed (trajdata.format.codec)"]


def test_a_long_function_is_found(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    root = _tree(tmp_path, {"f.py": f"def ok():\n{body[: -len('    x79 = 79')-1]}\n\ndef long():\n{body}"})
    assert long_functions(root) == ["trajdata.f.long: 81 lines"]


# ---- the CLI ---------------------------------------------------------------------------------------

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


def _command(path: list[str]):
    import click

    from trajdata.cli.main import cli

    ctx, cmd = click.Context(cli, info_name="trajdata"), cli
    for p in path:
        cmd = cmd.get_command(ctx, p)
        ctx = click.Context(cmd, info_name=p, parent=ctx)
    return cmd


@pytest.mark.parametrize("path, cls, not_flags", [
    (["collect", "scripted"], "trajdata.collectors.config:CollectConfig", ()),
    (["import", "nld"], "trajdata.importers.nld:NldImportConfig", ()),
    (["train", "ppo"], "trajdata.train.ppo:PPOConfig", ()),
    (["train", "bc"], "trajdata.train.bc:BCConfig", ("dataset",)),
    (["train", "rl"], "trajdata.rl.config:RLConfig", ()),
    (["eval"], "trajdata.evaluate.config:EvalConfig", ()),
    (["sweep"], "trajdata.sweep.run:SweepOptions", ()),
    (["scaling", "fit"], "trajdata.scaling.fits:FitConfig", ()),
    (["scaling", "forecast"], "trajdata.scaling.fits:FitConfig", ()),
    (["pack"], "trajdata.packs.build:PackConfig", ("source",)),
    (["unpack"], "trajdata.packs.build:UnpackConfig", ("pack",)),
])
def test_every_config_reaches_its_command_one_way(path, cls, not_flags):
    """Every field of the stage's config is a flag generated from it: its help, its default, its
    values through the config's own type check."""
    import dataclasses
    import importlib

    from trajdata.cli.options import FieldType
    from trajdata.config import option_meta

    module, _, name = cls.partition(":")
    config = getattr(importlib.import_module(module), name)
    params = {p.name: p for p in _command(path).params}
    for f in dataclasses.fields(config):
        meta = option_meta(f)
        if not meta["cli"] or f.name in not_flags:
            assert f.name not in params or f.name in not_flags, (path, f.name)
            continue
        opt = params[f.name]
        assert opt.help == meta["help"] and meta["help"], (path, f.name)
        assert opt.is_flag or isinstance(opt.type, FieldType), (path, f.name)


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


def main(argv: list[str]) -> None:
    """Print the stage graph (or, with ``--modules``, the module graph) of the tree."""
    g = graph()
    if "--modules" in argv:
        for m in sorted(g, key=lambda m: (RANKS.get(stage(m), -1), m)):
            print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
        return
    sg = stage_graph(g)
    n = {s: sum(1 for m in g if stage(m) == s) for s in sg}
    for s in STAGES:
        if s in sg:
            print(f"{RANKS[s]:2d} {s:11s} ({n[s]:2d} modules) -> {', '.join(sorted(sg[s], key=RANKS.get)) or '-'}")
    print(f"cycles between modules: {find_cycle(g) or 'none'}; "
          f"arrows into a later or same-rank stage: {len(later_stage_imports(g, RANKS))}")


if __name__ == "__main__":
    main(sys.argv[1:])
