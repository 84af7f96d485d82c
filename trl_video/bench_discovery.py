"""The repository's ``benchmarks/<method>/`` folders as ``trl-video bench <method>.<name>`` commands.

Experiment drivers, toy studies and paper-reproduction benches live outside the installable packages, in the
top-level ``benchmarks/`` tree of the repository. Each ``benchmarks/<method>/bench.py`` declares

    BENCHMARKS = {"compare": compare_main, ...}   # name -> function(argv: list[str]) -> int
    BENCHMARK_ALIASES = {"velr-compare": "compare"}  # optional: former names
    BUILDS = {"out/velr/data": "trl-video bench velr.build-dataset --out out/velr/data"}  # optional, see below

registered as ``<method>.<name>``. ``BUILDS`` names the command that makes a dataset or model a shipped recipe
reads (its ``offline_latents``, ``model``, ...): a dry run or training that finds the path missing says which
command to run (:func:`build_command`). The names are read from the file without importing it (so a broken benchmark never slows down or stops
``trl-video train``); the module is imported, as ``trl_video_benchmarks.<method>.bench``, when a benchmark
runs. The folder is found next to the source tree of an editable / checkout install, or wherever
``TRL_VIDEO_BENCHMARKS`` points; a wheel install has none (``trl-video bench`` says where they are).
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BENCHMARKS_ENV = "TRL_VIDEO_BENCHMARKS"
PACKAGE = "trl_video_benchmarks"
REPOSITORY_HINT = ("the method benchmarks live in the repository's benchmarks/ folder: run them from a checkout "
                   f"(pip install -e . plugins/*/), or set {BENCHMARKS_ENV} to a copy of that folder")

BenchFn = Callable[[list[str]], int]


def benchmarks_root() -> Path | None:
    """``$TRL_VIDEO_BENCHMARKS``, else ``benchmarks/`` beside the source tree of a checkout install."""
    env = os.environ.get(BENCHMARKS_ENV)
    root = Path(env).resolve() if env else Path(__file__).resolve().parents[1] / "benchmarks"
    return root if root.is_dir() else None


def _package(root: Path) -> ModuleType:
    """The synthetic package ``trl_video_benchmarks`` whose sub-packages are the method folders."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is None or list(getattr(pkg, "__path__", [])) != [str(root)]:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(root)]
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pkg
        for name in [m for m in sys.modules if m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
    return pkg


def import_benchmark(method: str, module: str = "bench") -> ModuleType:
    """Import ``benchmarks/<method>/<module>.py`` (relative imports inside the folder work)."""
    root = benchmarks_root()
    if root is None:
        from .errors import TrlVideoError

        raise TrlVideoError(f"no benchmarks folder: {REPOSITORY_HINT}")
    _package(root)
    return importlib.import_module(f"{PACKAGE}.{method}.{module}")


def _literal_dict(tree: ast.Module, var: str) -> ast.Dict | None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == var for t in targets):
            value = getattr(node, "value", None)
            if not isinstance(value, ast.Dict):
                raise ValueError(f"{var} must be a dict literal")
            return value
    return None


def declared_benchmarks(bench_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``BENCHMARKS = {"name": function, ...}`` and the optional ``BENCHMARK_ALIASES = {"old": "name"}`` of a
    bench.py, read without importing it: (name -> function name, alias -> name)."""
    tree = ast.parse(bench_file.read_text(), str(bench_file))
    table = _literal_dict(tree, "BENCHMARKS")
    if table is None:
        raise ValueError("no BENCHMARKS mapping")
    names = {}
    for k, v in zip(table.keys, table.values):
        if not (isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Name)):
            raise ValueError('BENCHMARKS entries must be "name": function')
        names[k.value] = v.id
    aliases = {}
    alias_table = _literal_dict(tree, "BENCHMARK_ALIASES")
    for k, v in zip(alias_table.keys, alias_table.values) if alias_table is not None else ():
        if not (isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and v.value in names):
            raise ValueError("BENCHMARK_ALIASES entries must be \"old name\": \"a BENCHMARKS name\"")
        aliases[str(k.value)] = str(v.value)
    return names, aliases


def declared_builds(bench_file: Path) -> dict[str, str]:
    """The optional ``BUILDS = {"path": "command", ...}`` of a bench.py, read without importing it."""
    table = _literal_dict(ast.parse(bench_file.read_text(), str(bench_file)), "BUILDS")
    builds = {}
    for k, v in zip(table.keys, table.values) if table is not None else ():
        if not (isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Constant)
                and isinstance(v.value, str)):
            raise ValueError('BUILDS entries must be "path": "command"')
        builds[k.value] = v.value
    return builds


def build_command(path: str) -> str | None:
    """The command that makes ``path`` as a ``benchmarks/<method>/bench.py`` declares it in ``BUILDS`` (paths
    compared after resolving both against the working directory); None without a declaration or a benchmarks
    folder (a folder that cannot be read is skipped: it is reported by ``trl-video bench``)."""
    root = benchmarks_root()
    if root is None:
        return None
    want = Path(path).expanduser().resolve()
    for bench_file in sorted(root.glob("*/bench.py")):
        try:
            builds = declared_builds(bench_file)
        except (OSError, SyntaxError, ValueError):
            continue
        for built, command in builds.items():
            if Path(built).expanduser().resolve() == want:
                return command
    return None


def missing_path_hint(path: str) -> str:
    """``"; build it with: <command>"`` for a missing path some benchmark declares it builds, else ``""``."""
    command = build_command(path)
    return f"; build it with: {command}" if command else ""


def _lazy(method: str, function: str) -> BenchFn:
    def run(argv: list[str]) -> int:
        fn = getattr(import_benchmark(method), function)
        return int(fn(argv) or 0)

    run.__name__ = f"{method}.{function}"
    run.__doc__ = f"benchmarks/{method}/bench.py:{function}"
    return run


@dataclass
class FolderBenchmark:
    method: str  # the folder name: benchmarks/<method>/
    name: str  # registered as <method>.<name>
    fn: BenchFn
    aliases: list[str]


def discover_benchmarks(broken: dict[str, str] | None = None) -> list[FolderBenchmark]:
    """Every benchmark declared in ``benchmarks/*/bench.py``; a folder whose bench.py cannot be read is reported
    in ``broken`` and skipped."""
    root = benchmarks_root()
    if root is None:
        return []
    out = []
    for bench_file in sorted(root.glob("*/bench.py")):
        method = bench_file.parent.name
        try:
            names, aliases = declared_benchmarks(bench_file)
        except (OSError, SyntaxError, ValueError) as exc:
            if broken is not None:
                broken[f"benchmarks/{method}"] = f"benchmarks/{method}/bench.py: {type(exc).__name__}: {exc}"
            continue
        out += [FolderBenchmark(method, name, _lazy(method, fn), [a for a, n in aliases.items() if n == name])
                for name, fn in names.items()]
    return out
