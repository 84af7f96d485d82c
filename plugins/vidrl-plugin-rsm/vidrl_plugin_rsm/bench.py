"""``trl-video bench rsm-estimators`` / ``rsm-grpo``: thin launchers of the drivers in the checkout's
``benchmarks/rsm/`` (experiment code lives there, not in this package)."""

from __future__ import annotations

import runpy
from pathlib import Path

from trl_video.errors import TrlVideoError


def _driver(name: str) -> Path:
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents, *here.parents):
        path = base / "benchmarks" / "rsm" / name
        if path.is_file():
            return path
    raise TrlVideoError(f"benchmarks/rsm/{name} not found: run this benchmark from a checkout of the repository")


def _run(name: str, argv: list[str]) -> int:
    return int(runpy.run_path(str(_driver(name)), run_name="rsm_bench")["main"](argv) or 0)


def bench_estimators(argv: list[str]) -> int:
    return _run("estimators.py", argv)


def bench_grpo(argv: list[str]) -> int:
    return _run("grpo_cpu.py", argv)
