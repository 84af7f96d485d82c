"""Every shipped recipe validates with ``trl-video train --recipe R --dry-run`` (the full-size ones without a
download: the geometry of the shipped hub models is known). A recipe that reads a dataset or model an earlier
command makes stops, while that path is missing, with one ``error:`` line naming the command that builds it
(exit 2), and validates once the path exists (a stand-in here: the dry run checks presence, not content)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_video import cli

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")
                 if p.parent.name != "accelerate")  # accelerate launcher configs, not training recipes

#: recipe -> (key it stops at, path as shipped, the command the error names)
PREREQUISITES = {
    "recipes/tiny/dmalign_pair.yaml": ("offline_latents", "out/dmalign_experiments/preferred_latents",
                                       "trl-video bench dmalign.experiments preferred"),
    "recipes/tiny/fcrm_hybrid.yaml": ("offline_latents", "out/fcrm/world_latents_alignment",
                                      "trl-video bench fcrm.build-offline"),
    "recipes/tiny/fcrm_offline.yaml": ("offline_latents", "out/fcrm/world_latents_luminance",
                                       "trl-video bench fcrm.build-offline"),
    "recipes/tiny/reward_forcing_ode.yaml": ("method_args.ode_dataset", "out/tiny/reward_forcing_ode_data",
                                             "trl-video bench reward_forcing.build-ode --teacher tiny-wan "
                                             "--out out/tiny/reward_forcing_ode_data --num 512"),
    "recipes/reward_forcing_wan.yaml": ("method_args.ode_dataset", "data/rf_ode_wan",
                                        "trl-video bench reward_forcing.build-ode --teacher "
                                        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers --out data/rf_ode_wan"),
    "recipes/tiny/reward_forcing_reward.yaml": ("model", "out/tiny/reward_forcing_ode/model",
                                                "trl-video train --recipe recipes/tiny/reward_forcing_ode.yaml"),
}


def dry_run(capsys: pytest.CaptureFixture[str], recipe: str, *sets: str) -> tuple[int, str, str]:
    extra = ["--set", *sets] if sets else []
    code = cli.main(["train", "--recipe", str(REPO / recipe), "--dry-run", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_recipe_list_is_complete() -> None:
    assert len(RECIPES) >= 30 and set(PREREQUISITES) <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipe_dry_runs(recipe: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name their prompt files and outputs relative to the checkout
    code, out, err = dry_run(capsys, recipe)
    if recipe not in PREREQUISITES or (REPO / PREREQUISITES[recipe][1]).exists():
        assert code == 0, err
        assert f"recipe   {REPO / recipe}: valid" in out
        return
    key, path, command = PREREQUISITES[recipe]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and f"{key}: " in lines[0] and path in lines[0]
    assert f"build it with: {command}" in lines[0]
    # the same recipe once the path exists
    stand_in = tmp_path / "built"
    stand_in.mkdir()
    (stand_in / "ode_meta.json").write_text("{}")
    if key == "model":  # stage 2 starts from the stage-1 model: the base it was made from stands in for it
        sets = ["model=tiny-wan"]
    else:
        sets = [f"{key}={stand_in}"]
    code, out, err = dry_run(capsys, recipe, *sets)
    assert code == 0, err
