"""bench compare's one-off set-up steps: which rows need one (``setup.yaml``, skipped when what it creates exists),
and running them: commands split like a shell (quoted arguments kept), a failing command stops the rest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trl_video.bench_discovery import import_benchmark

B = import_benchmark("compare", "bench")


def test_setup_specs_pick_rows_whose_output_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipes = [Path("recipes/compare/velr.yaml"), Path("recipes/compare/refl.yaml")]
    todo = B.setup_specs(recipes, tmp_path)
    assert list(todo) == ["velr"] and todo["velr"]["creates"] == "out/tiny/velr_lrm_wan" and todo["velr"]["commands"]
    (tmp_path / "out/tiny/velr_lrm_wan").mkdir(parents=True)
    assert B.setup_specs(recipes, tmp_path) == {}
    assert "set-up of velr: out/tiny/velr_lrm_wan exists, not rebuilt" in capsys.readouterr().out


def test_run_setup_keeps_quoted_arguments_and_stops_at_a_failure(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    py = sys.executable
    spec = {"commands": [f"{py} -c 'import os; print(\"threads\", os.environ[\"OMP_NUM_THREADS\"])'",
                         f"{py} -c 'import sys; sys.exit(3)'",
                         f"{py} -c 'open(\"never\", \"w\")'"]}
    took = B.run_setup("row", spec, tmp_path, threads=3, log=tmp_path / "logs" / "row.log")
    assert took > 0
    assert (tmp_path / "logs" / "row.log").read_text().strip() == "threads 3"
    assert not (tmp_path / "never").exists()  # the command after the failing one did not run
    assert "set-up of row failed (exit 3" in capsys.readouterr().out
