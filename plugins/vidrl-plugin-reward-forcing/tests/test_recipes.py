"""Recipes validate with --dry-run; bad method_args stop with one error line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl_video import cli

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("recipe", ["recipes/reward_forcing_wan.yaml", "recipes/tiny/reward_forcing_ode.yaml"])
def test_dry_run(recipe, capsys, tmp_path):
    (tmp_path / "ode_meta.json").write_text("{}")  # stage 1 needs the trajectories: a dry run checks they exist
    assert cli.main(["train", "--recipe", str(REPO / recipe), "--dry-run", "--set",
                     f"method_args.ode_dataset={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "self_rollout" in out and "reward-forcing" in out


def test_bad_frames_option_names_the_key(capsys):
    code = cli.main(["train", "--recipe", str(REPO / "recipes/tiny/reward_forcing_ode.yaml"), "--dry-run",
                     "--set", "method_args.frames=middle"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "method_args.frames" in err[0]


def test_missing_ode_dataset_names_the_command(tmp_path, capsys):
    code = cli.main(["train", "--recipe", str(REPO / "recipes/tiny/reward_forcing_ode.yaml"), "--output-dir",
                     str(tmp_path / "o"), "--set", f"method_args.ode_dataset={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert code == 2 and "build-ode" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
