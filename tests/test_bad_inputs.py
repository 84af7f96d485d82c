"""Bad inputs through the real CLI entry point: exit code 2, one ``error:`` line naming the culprit, no
traceback, and nothing that existed before is touched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trl_video import cli, plugins
from trl_video.data import save_offline_latents
from trl_video.plugins import DISABLE_ENV

REPO = Path(__file__).resolve().parents[1]
#: the latent shape of tiny-wan-random: 8 channels, 9 frames -> 5, 32 px -> 8
TINY_WAN_LATENT = (8, 5, 8, 8)
#: a tqdm meter ("train:   0%|    | 0/1 [00:00<?, ?it/s]", "Generating train split: 121 examples [00:00, 9.1
#: examples/s]"): library progress output on stderr, not an error line
METER = re.compile(r"[^\r\n]*?\[\d+:\d+(?:<|, )[^\]]*\]")
#: cursor movements tqdm emits when an earlier bar in this process was never closed
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

FAST: dict[str, Any] = {
    "model": "tiny-wan-random",
    "method": "refl",
    "reward": "luminance",
    "sampler_args": {"num_steps": 2, "grad_steps": 1},
    "prompts_per_step": 2,
    "group_size": 1,
    "max_steps": 1,
    "report_to": "none",
    "save_model_at_end": False,
}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def reward_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway module with dotted-path rewards (latent space: no VAE decode, so the tests stay fast)."""
    folder = tmp_path_factory.mktemp("rewardmod")
    name = f"trlv_bad_rewards_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent("""
        def latent_energy(inputs, prompts):
            return -(inputs.float() ** 2).flatten(1).mean(1)

        latent_energy.space = "latent"
        latent_energy.differentiable = True

        def nan_reward(inputs, prompts):
            return inputs.new_full((inputs.shape[0],), float("nan"))

        nan_reward.space = "latent"
        nan_reward.differentiable = True

        def blackbox(inputs, prompts):
            return inputs.float().flatten(1).mean(1).detach()

        blackbox.space = "latent"
        blackbox.differentiable = False

        def list_reward(inputs, prompts):
            return [0.5] * inputs.shape[0]

        list_reward.space = "latent"
        list_reward.differentiable = True

        def int_reward(inputs, prompts):
            import torch
            return torch.ones(inputs.shape[0], dtype=torch.int64)

        int_reward.space = "latent"
        int_reward.differentiable = True

        def str_reward(inputs, prompts):
            return ["good"] * inputs.shape[0]

        str_reward.space = "latent"
        str_reward.differentiable = True

        KILL = {"at": None, "calls": 0}

        def sigterm_energy(inputs, prompts):
            # latent_energy that sends this process a real SIGTERM during its KILL["at"]-th call
            import os
            import signal
            KILL["calls"] += 1
            if KILL["calls"] == KILL["at"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return -(inputs.float() ** 2).flatten(1).mean(1)

        sigterm_energy.space = "latent"
        sigterm_energy.differentiable = True

        class ServiceReward:
            space = "latent"
            differentiable = True

            def __init__(self, api_key, endpoint=""):
                self.api_key, self.endpoint = api_key, endpoint

            def __call__(self, inputs, prompts):
                return -(inputs.float() ** 2).flatten(1).mean(1)

        def raising_reward(inputs, prompts):
            raise ValueError("scoring service said no")

        raising_reward.space = "latent"
        raising_reward.differentiable = True
    """))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield name


#: the folder whose files every failing CLI call must leave byte-identical: the running test's tmp_path
GUARDED: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import datasets

    # datasets reads its cache root at call time: keep the json/world caches out of ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
    monkeypatch.setitem(GUARDED, "root", tmp_path)


def write_recipe(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump({**FAST, **overrides}, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, size, mtime_ns) of every file under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                               st.st_mtime_ns)
    return out


def close_stray_progress_bars() -> None:
    """Close the progress bars an earlier failure left open: they print when closed or garbage-collected, which
    must not land in the next case's stderr. (Closing them is cheaper than a full ``gc.collect()`` per case.)"""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # type: ignore[attr-defined]
        bar.close()


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[Any]) -> tuple[int, str, str]:
    """``trl_video.cli.main(argv)`` in this process: (exit code, stdout, stderr). A call that ends with exit code 2
    must leave every file that existed under the test's tmp_path byte-identical (hash, size and mtime)."""
    close_stray_progress_bars()
    capsys.readouterr()  # drop whatever the test's own setup printed (and the closed bars)
    root = GUARDED["root"]
    before = snapshot(root)
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code == 2:
        after = snapshot(root)
        changed = [k for k, v in before.items() if after.get(k) != v]
        assert not changed, f"a failed run changed or removed {changed}\n{err}"
    return code, out, err


def record(code: int, line: str) -> None:
    """Log a case's exit code and error line: docs/bad-inputs.md is built from these records."""
    if os.environ.get("TRLV_BAD_INPUTS_LOG"):
        with open(os.environ["TRLV_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
                                "code": code, "error": line}) + "\n")


def cli_command() -> list[str]:
    """``trl-video`` as a user runs it: the installed console script (``python -m trl_video.cli`` without one)."""
    script = Path(sys.executable).with_name("trl-video")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trl_video.cli"]


def subprocess_env(reward_module: str) -> dict[str, str]:
    """This environment, with the test's reward module importable in a child process."""
    import importlib.util

    spec = importlib.util.find_spec(reward_module)
    assert spec is not None and spec.origin is not None
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(spec.origin).parent),
                                                         os.environ.get("PYTHONPATH", "")])}


def assert_one_line_error(code: int, err: str, *culprits: str, glued_ok: bool = False) -> str:
    """Exit code 2 and exactly one non-progress stderr line, starting with "error:" and naming ``culprits``.

    ``glued_ok``: tolerate a progress meter left unterminated right before the error on the same line.
    """
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = []
    for raw in ANSI.sub("", err).splitlines():
        rest = METER.sub("", raw).strip()
        if rest:
            assert glued_ok or rest == raw.strip(), f"error glued to a progress bar: {raw!r}"
            lines.append(rest)
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    record(code, line)
    for c in culprits:
        assert c in line, f"{c!r} not named in: {line}"
    return line


def train_argv(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", str(recipe), "--output-dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------ recipe-level
@pytest.mark.parametrize(
    ("recipe_extra", "culprits"),
    [
        pytest.param({"lerning_rate": 1e-3}, ["unknown key 'lerning_rate'", "did you mean 'learning_rate'"],
                     id="unknown-key"),
        pytest.param({"max_steps": "ten"}, ["'max_steps'", "int"], id="wrong-type-int"),
        pytest.param({"use_lora": "yes"}, ["'use_lora'", "bool"], id="wrong-type-bool"),
        pytest.param({"learning_rate": "fast"}, ["'learning_rate'", "float"], id="wrong-type-float-string"),
        pytest.param({"group_size": 0}, ["group_size", ">= 1"], id="group-size-zero"),
        pytest.param({"mixed_precision": "fp8"}, ["mixed_precision", "fp8"], id="bad-mixed-precision"),
        pytest.param({"method": "reflx"}, ["unknown method 'reflx'", "did you mean 'refl'"], id="unknown-method"),
        pytest.param({"reward": "lumnance"}, ["unknown reward 'lumnance'", "did you mean 'luminance'"],
                     id="unknown-reward"),
        pytest.param({"reward": "trlv_no_such_module_xyz:score"}, ["trlv_no_such_module_xyz"],
                     id="dotted-reward-not-importable"),
        pytest.param({"sampler": "windw"}, ["unknown sampler 'windw'", "did you mean 'window'"],
                     id="unknown-sampler"),
        pytest.param({"method_args": {"kl_wieght": 0.1}},
                     ["method_args (refl)", "unknown key 'kl_wieght'", "did you mean 'kl_weight'"],
                     id="unknown-method-arg"),
    ],
)
def test_bad_recipe_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe_extra: dict[str, Any],
                           culprits: list[str]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", **recipe_extra)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    assert_one_line_error(code, err, *culprits)
    assert not out.exists()


def test_method_of_an_uninstalled_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # vidrl-plugin-velr may be installed in this environment: hide it the way a user would
    # (TRL_VIDEO_DISABLED_PLUGINS) and rebuild the process-wide registry; monkeypatch restores the cached one
    monkeypatch.setenv(DISABLE_ENV, "velr,vidrl-plugin-velr,vidrl_plugin_velr")
    monkeypatch.setattr(plugins, "_DEFAULT", None)
    recipe = write_recipe(tmp_path / "recipe.yaml", method="velr")
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "unknown method 'velr'", "pip install vidrl-plugin-velr")
    assert not (tmp_path / "out").exists()


def test_sampler_start_range_beyond_num_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml",
                          sampler_args={"num_steps": 2, "grad_steps": 1, "start_range": [15, 25]})
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "start_range")


def test_bad_recipe_in_a_real_process(tmp_path: Path) -> None:
    """The exit status a shell sees (the console script's ``sys.exit``), not only ``main()``'s return value; the
    output dir of an earlier run is left as it was."""
    recipe = write_recipe(tmp_path / "recipe.yaml", max_steps=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    proc = subprocess.run([*cli_command(), *train_argv(recipe, out)], capture_output=True, text=True, timeout=600)
    assert_one_line_error(proc.returncode, proc.stderr, str(recipe), "max_steps must be >= 1", "got 0")
    assert snapshot(tmp_path) == before


def test_recipe_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "recipe.yaml"
    code, _, err = run_cli(capsys, train_argv(missing, tmp_path / "out"))
    assert_one_line_error(code, err, "recipe not found", str(missing))


def test_recipe_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: tiny-wan-random\nsampler_args: {num_steps: 2\nmax_steps: [1\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(recipe), "not valid YAML")
    assert snapshot(tmp_path) == before


def test_recipe_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- model: tiny-wan-random\n- max_steps: 1\n")
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(recipe), "must be a mapping", "list")


@pytest.mark.parametrize(("item", "culprits"), [("max_steps", ["--set 'max_steps'", "key=value"]),
                                                ("model.depth=3", ["--set 'model.depth=3'", "'model'"])])
def test_bad_set_override(tmp_path: Path, capsys: pytest.CaptureFixture[str], item: str,
                          culprits: list[str]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml")
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out", "--set", item))
    assert_one_line_error(code, err, *culprits)


# ------------------------------------------------------------------------------------------------ data
def test_prompts_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing_prompts.jsonl"
    recipe = write_recipe(tmp_path / "recipe.yaml", prompts=str(missing))
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "prompts", str(missing))
    assert not (tmp_path / "out").exists()


def test_prompts_file_without_prompt_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "a red circle moving left on a dark background"}\n'
                       '{"text": "a blue square moving up on a light background"}\n')
    recipe = write_recipe(tmp_path / "recipe.yaml", prompts=str(prompts))
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(prompts), "no column 'prompt'", "text")
    assert not (tmp_path / "out").exists()
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before


def test_offline_latents_folder_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_latents"
    recipe = write_recipe(tmp_path / "recipe.yaml", offline_latents=str(missing))
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "offline_latents", str(missing))
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_offline_latents_wrong_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lat = tmp_path / "latents"
    save_offline_latents(str(lat), ["a red circle moving left on a dark background"] * 2, torch.zeros(2, 4, 2, 8, 8))
    recipe = write_recipe(tmp_path / "recipe.yaml", offline_latents=str(lat))
    before = snapshot(lat)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "offline_latents", str(lat), "(4, 2, 8, 8)", str(TINY_WAN_LATENT))
    assert snapshot(lat) == before
    assert not (tmp_path / "out").exists()


def test_nan_reward_names_the_reward(tmp_path: Path, capsys: pytest.CaptureFixture[str], reward_module: str) -> None:
    name = f"{reward_module}:nan_reward"
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=name)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    # glued_ok: see test_error_is_not_glued_to_the_progress_bar
    assert_one_line_error(code, err, f"reward '{name}'", "NaN", glued_ok=True)
    assert not list(out.glob("checkpoint-*")) and not (out / "model").exists()


def test_error_is_not_glued_to_the_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                reward_module: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:nan_reward")
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "nan_reward")


# ------------------------------------------------------------------------------------------------ existing outputs
def test_existing_checkpoint_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  reward_module: str) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy")
    code, stdout, err = run_cli(capsys, train_argv(recipe, out))
    assert code == 0, err
    assert "done: 1 steps" in stdout
    assert (out / "checkpoint-1" / "trainer_state.json").exists()
    before = snapshot(out)
    assert len(before) >= 5
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    line = assert_one_line_error(code, err, str(out), "checkpoint-1", "--resume")
    assert "nothing was changed" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"], ids=["output-dir-is-a-file", "output-dir-under-a-file"])
def test_output_dir_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str], reward_module: str,
                                      where: str) -> None:
    """An output dir that cannot be made (a file is in the way; as root, permissions do not stop writes, so a
    read-only folder cannot be set up in a test): one line naming it, the file untouched (run_cli checks)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "is-a-file" else blocker / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy")
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    assert_one_line_error(code, err, f"output dir '{out}' cannot be created")


def test_fresh_run_over_the_metrics_of_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      reward_module: str) -> None:
    """A run killed before its first checkpoint left metrics.jsonl: a new run there would repeat its steps."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy")
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    assert_one_line_error(code, err, f"output dir '{out}'", "metrics.jsonl of an earlier run")


def test_encode_out_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "latents_out"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    (tmp_path / "videos").mkdir()
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, ["encode", "--videos", tmp_path / "videos", "--model", "tiny-wan-random",
                                    "--out", existing])
    assert_one_line_error(code, err, "--out", str(existing), "already exists")
    assert snapshot(tmp_path) == before


def test_eval_checkpoint_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "run"
    (ck / "checkpoint-3").mkdir(parents=True)
    (ck / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(ck)
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", ck, "--num-prompts", "1", "--num-steps", "1"])
    assert_one_line_error(code, err, "--checkpoint", str(ck), "no saved model")
    assert snapshot(ck) == before
    assert not (ck / "eval").exists()


def test_push_checkpoint_without_model_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "run"
    (ck / "model" / "transformer").mkdir(parents=True)
    (ck / "model" / "transformer" / "config.json").write_text("{}")
    before = snapshot(ck)
    code, _, err = run_cli(capsys, ["push", "--checkpoint", ck, "--repo-id", "user/x",
                                    "--endpoint", "http://127.0.0.1:9"])
    assert_one_line_error(code, err, "--checkpoint", str(ck), "model_index.json")
    assert snapshot(ck) == before


# ------------------------------------------------------------------------------------------------ dry runs
def test_dry_run_quickstart(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, ["train", "--recipe", REPO / "recipes" / "quickstart.yaml", "--dry-run"])
    assert code == 0, err
    assert "valid" in out and "method    refl" in out and "window" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_refl_wan_names_missing_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the dry run (no weights, no network) checks the prompt file a user swaps in; as shipped it validates from
    # the repository root
    monkeypatch.chdir(tmp_path)
    recipe = ["train", "--recipe", REPO / "recipes" / "refl_wan.yaml", "--dry-run", "--set", "prompts=prompts.jsonl"]
    code, _, err = run_cli(capsys, recipe)
    assert_one_line_error(code, err, "prompts", "prompts.jsonl", "not found")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat surfing"}\n')
    code, out, err = run_cli(capsys, recipe)
    assert code == 0, err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in out and "kl_weight': 0.1" in out
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, ["train", "--recipe", REPO / "recipes" / "refl_wan.yaml", "--dry-run",
                                      "--output-dir", str(tmp_path / "shipped")])
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ validation
#: (recipe keys, culprits named in the error) -- every case is refused identically by --dry-run and by train,
#: before anything is loaded or written
VALIDATION_CASES = [
    pytest.param({"lora_r": 0}, ["lora_r must be >= 1", "got 0"], id="lora-rank-zero"),
    pytest.param({"adam_beta1": 2}, ["adam_beta1 must be < 1", "got 2"], id="adam-beta1-2"),
    pytest.param({"adam_beta2": -0.1}, ["adam_beta2"], id="adam-beta2-negative"),
    pytest.param({"adam_epsilon": 0}, ["adam_epsilon must be > 0"], id="adam-epsilon-zero"),
    pytest.param({"weight_decay": -0.1}, ["weight_decay"], id="weight-decay-negative"),
    pytest.param({"lr_scheduler_type": "cosin"}, ["lr_scheduler_type", "'cosin'", "did you mean 'cosine'"],
                 id="unknown-scheduler"),
    pytest.param({"lr_scheduler_type": "reduce_lr_on_plateau"}, ["lr_scheduler_type", "reduce_lr_on_plateau"],
                 id="unsupported-scheduler"),
    pytest.param({"seed": -1}, ["seed", "got -1"], id="negative-seed"),
    pytest.param({"save_steps": -1}, ["save_steps"], id="negative-save-steps"),
    pytest.param({"save_total_limit": 0}, ["save_total_limit"], id="save-total-limit-zero"),
    pytest.param({"max_grad_norm": -1.0}, ["max_grad_norm"], id="negative-max-grad-norm"),
    pytest.param({"warmup_steps": -5}, ["warmup_steps"], id="negative-warmup"),
    pytest.param({"ema_decay": 1.0}, ["ema_decay must be < 1"], id="ema-decay-one"),
    pytest.param({"learning_rate": float("nan")}, ["learning_rate must be > 0", "nan"], id="learning-rate-nan"),
    pytest.param({"eval_num_steps": 0}, ["eval_num_steps"], id="eval-num-steps-zero"),
    pytest.param({"learning_rate": float("inf")}, ["learning_rate", "finite"], id="learning-rate-inf"),
    pytest.param({"lora_target_modules": []}, ["lora_target_modules"], id="no-lora-targets"),
    pytest.param({"height": 30}, ["height 30", "multiple of 8", "tiny-wan-random"], id="height-not-patch-multiple"),
    pytest.param({"width": 36}, ["width 36", "multiple of 8"], id="width-not-patch-multiple"),
    pytest.param({"height": 512}, ["height 512", "too large", "at most 256"], id="height-beyond-rope"),
    pytest.param({"num_frames": 8}, ["num_frames 8", "2k+1", "e.g. 7"], id="num-frames-not-2k+1"),
    pytest.param({"num_frames": 101}, ["num_frames 101", "too large"], id="num-frames-beyond-rope"),
    pytest.param({"model": "tiny-cogvideox-random", "num_frames": 7}, ["num_frames 7", "4k+1"],
                 id="num-frames-cogvideox-not-4k+1"),
    pytest.param({"eval_rewards": ["lumnance"]}, ["eval_rewards[0]", "unknown reward 'lumnance'"],
                 id="unknown-eval-reward"),
    pytest.param({"reward_args": {"scale": 2}}, ["reward_args", "'scale'"], id="unknown-reward-arg"),
    pytest.param({"sampler_args": {"num_stps": 2}}, ["sampler_args", "'num_stps'", "did you mean 'num_steps'"],
                 id="unknown-sampler-arg"),
    pytest.param({"sampler_args": {"num_steps": 2, "grad_steps": 5}}, ["grad_steps"], id="grad-steps-beyond-steps"),
    pytest.param({"estimator": "group", "group_size": 2, "estimator_args": {"std": "bogus"}},
                 ["estimator_args.std", "bogus"], id="bad-estimator-choice"),
    pytest.param({"method": "fcrm", "sampler_args": {"num_steps": 2}, "group_size": 1},
                 ["group_size is 1", "estimator 'group'"], id="group-estimator-group-size-1"),
    pytest.param({"replay": "offline"}, ["replay 'offline'", "offline_latents"], id="offline-replay-without-data"),
    pytest.param({"sampler_args": {"num_steps": 2, "grad_steps": 1, "behaviour": "ema"}},
                 ["behaviour 'ema'", "ema_decay"], id="ema-behaviour-without-ema"),
    pytest.param({"prompts": "world:test"}, ["prompts", "world:test"], id="unknown-world-split"),
    pytest.param({"push_to_hub": True}, ["push_to_hub", "hub_model_id"], id="push-without-repo"),
    pytest.param({"hub_model_id": "no-slash"}, ["hub_model_id", "no-slash"], id="bad-hub-id"),
    pytest.param({"reward": "luminance+motion", "reward_args": {"weights": {"lum": 1}}},
                 ["reward_args.weights", "luminance+motion"], id="reward-sum-bad-weight-key"),
    pytest.param({"reward": "luminance+motion", "reward_args": {"luminance": {"foo": 1}}},
                 ["part 'luminance'", "'foo'"], id="reward-sum-bad-part-arg"),
    pytest.param({"prompt_column": " "}, ["prompt_column", "empty"], id="blank-prompt-column"),
]


@pytest.mark.parametrize("mode", ["dry-run", "train"])
@pytest.mark.parametrize(("recipe_extra", "culprits"), VALIDATION_CASES)
def test_validation_shared_by_dry_run_and_train(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str,
                                                recipe_extra: dict[str, Any], culprits: list[str]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", **recipe_extra)
    out = tmp_path / "out"
    extra = ["--dry-run"] if mode == "dry-run" else []
    code, stdout, err = run_cli(capsys, train_argv(recipe, out, *extra))
    assert_one_line_error(code, err, *culprits)
    assert "valid" not in stdout and not out.exists()


def test_non_differentiable_reward_under_refl(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              reward_module: str) -> None:
    name = f"{reward_module}:blackbox"
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=name)
    for extra in (["--dry-run"], []):
        code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out", *extra))
        assert_one_line_error(code, err, f"reward '{name}' is not differentiable", "method 'refl'")
    assert not (tmp_path / "out").exists()


def test_valid_dry_run_means_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            reward_module: str) -> None:
    """The other side of the shared validation: a recipe using the geometry limits exactly passes the dry run
    and trains."""
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy", height=16, width=24,
                          num_frames=5, lr_scheduler_type="cosine", eval_rewards=["motion"], lora_r=2)
    code, stdout, err = run_cli(capsys, train_argv(recipe, tmp_path / "out", "--dry-run"))
    assert code == 0 and "valid" in stdout, err
    code, stdout, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert code == 0 and "done: 1 steps" in stdout, err


# ------------------------------------------------------------------------------------------------ YAML
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        pytest.param("max_steps: 1\nmodel: tiny-wan-random\nmax_steps: 3\n",
                     ["duplicate key 'max_steps'", "lines 1 and 3"], id="duplicate-key"),
        pytest.param("", ["is empty"], id="empty-recipe"),
        pytest.param("# only a comment\n", ["is empty"], id="comment-only-recipe"),
        pytest.param(BOMB, ["expands to more than 100000 values"], id="alias-bomb"),
        pytest.param("a: &a [*a]\n", ["contains itself"], id="recursive-alias"),
        pytest.param("max_steps: 1\nreward_args:\n  api_key: ${env:TRLV_SURELY_UNSET_VAR}\n",
                     ["reward_args.api_key", "TRLV_SURELY_UNSET_VAR", "not set"], id="unset-env-reference"),
        pytest.param("model: !!python/object/apply:os.system ['true']\n", ["not valid YAML"], id="python-tag"),
    ],
)
def test_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, culprits: list[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    line = assert_one_line_error(code, err, *culprits)
    assert str(recipe) in line
    assert snapshot(tmp_path) == before


def test_alias_bomb_is_measured_without_expanding(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The bomb (under 600 bytes, 9**9 values) is refused by --dry-run too, and the size check visits each
    distinct list once instead of expanding it."""
    from trl_video import recipe_io

    assert len(BOMB) <= 600
    visits = []
    real = recipe_io.expanded_size
    monkeypatch.setattr(recipe_io, "expanded_size", lambda v, limit=recipe_io.MAX_RECIPE_VALUES: visits.append(1)
                        or real(v, limit))
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out", "--dry-run"))
    assert_one_line_error(code, err, "expands to more than")
    assert visits == [1]
    data = yaml.safe_load(BOMB)
    assert real(data, limit=10**12) == 1 + sum(1 + real(v, 10**12) for v in data.values()) > 9**9


def test_recipe_too_large(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "big.yaml"
    recipe.write_text("max_steps: 1\n" + "# padding\n" * 120_000)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(recipe), "bytes", "limited to 1048576")


def test_recipe_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, train_argv(tmp_path, tmp_path / "out"))
    assert_one_line_error(code, err, str(tmp_path), "is a folder")


def test_recipe_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(recipe), "UTF-8")


# ------------------------------------------------------------------------------------------------ eval
def fake_model_dir(root: Path) -> Path:
    """A run folder whose model/ has a model_index.json (enough for argument checks that precede loading)."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "model_index.json").write_text("{}")
    (root / "eval").mkdir()
    (root / "eval" / "eval_results.json").write_text('{"reward_after": 0.5}')
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        pytest.param(["--num-steps", "0"], ["--num-steps", ">= 1", "got 0"], id="eval-num-steps-0"),
        pytest.param(["--num-prompts", "0"], ["--num-prompts", "got 0"], id="eval-num-prompts-0"),
        pytest.param(["--seed", "-3"], ["--seed", "got -3"], id="eval-negative-seed"),
    ],
)
def test_eval_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                            culprits: list[str]) -> None:
    run = fake_model_dir(tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", run, *extra])
    assert_one_line_error(code, err, *culprits)
    assert snapshot(run) == before


def test_eval_never_replaces_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_model_dir(tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", run, "--out", run / "eval", "--num-prompts", "1"])
    assert_one_line_error(code, err, "--out", str(run / "eval"), "not empty")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, reward_module: str) -> tuple[Path, Path]:
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (latent reward: fast), and its recipe. The prompt
    file is named relatively, so a test can swap its content by changing directory."""
    root = tmp_path_factory.mktemp("trained")
    (root / "prompts.jsonl").write_text("".join(f'{{"prompt": "prompt {i}"}}\n' for i in range(4)))
    recipe = write_recipe(root / "recipe.yaml", reward=f"{reward_module}:latent_energy", max_steps=2, save_steps=1,
                          prompts="prompts.jsonl", report_to="tensorboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert cli.main(train_argv(recipe, root / "run")) == 0
    return recipe, root / "run"


@pytest.fixture
def run_copy(trained_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    recipe, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    shutil.copy(recipe.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    return recipe, tmp_path / "run"


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows the run (its EventAccumulator, purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / run.name)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _edit_step(p: Path) -> None:
    state = json.loads(p.read_text())
    state["global_step"] = -2
    p.write_text(json.dumps(state))


DAMAGE = {
    "flipped-byte": ("trainable.safetensors", _flip_byte, "trainable.safetensors does not match its sha256"),
    "truncated": ("optimizers.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), "optimizers.pt has 100 bytes"),
    "missing-file": ("rng-0.pt", lambda p: p.unlink(), "rng-0.pt is missing"),
    "no-manifest": ("manifest.json", lambda p: p.unlink(), "no manifest.json"),
    "negative-global-step": ("trainer_state.json", _edit_step, "trainer_state.json"),
    "partial-checkpoint": ("trainer_state.json", lambda p: p.unlink(), "trainer_state.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_names_the_intact_one(run_copy: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str], damage: str) -> None:
    recipe, run = run_copy
    name, fn, reason = DAMAGE[damage]
    fn(run / "checkpoint-2" / name)
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume"))
    assert_one_line_error(code, err, f"latest checkpoint '{run / 'checkpoint-2'}' is damaged", reason,
                          f"newest intact checkpoint is '{run / 'checkpoint-1'}'", f"--resume {run / 'checkpoint-1'}")
    assert snapshot(run) == before


def test_no_intact_checkpoint_left(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe, run = run_copy
    for ck in ("checkpoint-1", "checkpoint-2"):
        _flip_byte(run / ck / "trainable.safetensors")
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume"))
    assert_one_line_error(code, err, "checkpoint-2", "no intact checkpoint is left")
    assert snapshot(run) == before


def test_resume_from_the_named_intact_checkpoint(run_copy: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The way out the error names works, and the rows logged after checkpoint-1 are not repeated."""
    recipe, run = run_copy
    _flip_byte(run / "checkpoint-2" / "trainable.safetensors")
    code, out, err = run_cli(capsys, train_argv(recipe, run, "--resume", run / "checkpoint-1"))
    assert code == 0, err
    assert "dropped 1 metrics rows logged after step 1" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # TensorBoard too: step 2 once, with the resumed run's value (the first run's step 2 is purged)
    scalars = tensorboard_scalars(run)
    assert "reward_mean" in scalars and all([s for s, _ in v] == [1, 2] for v in scalars.values()), scalars
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([r["reward_mean"] for r in rows], abs=1e-5)
    assert "checkpoint-2" in {p.name for p in run.iterdir()}
    assert not (run / ".trl-video.lock").exists()


def test_tensor_of_the_wrong_shape_is_refused(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A consistent checkpoint (manifest rewritten) from another model shape: refused, never broadcast."""
    from safetensors.torch import load_file, save_file

    from trl_video.checkpointing import write_manifest

    recipe, run = run_copy
    ck = run / "checkpoint-2"
    tensors = load_file(str(ck / "trainable.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1].clone()
    save_file(tensors, str(ck / "trainable.safetensors"))
    (ck / "manifest.json").unlink()
    write_manifest(ck)
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume"))
    assert_one_line_error(code, err, str(ck), name.split("/", 1)[1], "the model has")
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("extra", "keys"),
    [
        pytest.param(["--set", "learning_rate=0.5"], ["learning_rate"], id="resume-changed-lr"),
        pytest.param(["--set", "reward=luminance"], ["reward"], id="resume-changed-reward"),
        pytest.param(["--set", "sampler_args.num_steps=3"], ["sampler_args.num_steps"], id="resume-changed-sampler"),
    ],
)
def test_resume_refuses_unsafe_recipe_changes(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                              extra: list[str], keys: list[str]) -> None:
    recipe, run = run_copy
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume", *extra))
    line = assert_one_line_error(code, err, f"cannot resume '{run / 'checkpoint-2'}'", "--accept-recipe-changes")
    assert f"the recipe differs in {', '.join(keys)};" in line
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("extra", "keys", "fixed"),
    [
        pytest.param(["--set", "lora_r=4"], ["lora_r"], ["lora_r"], id="resume-changed-lora-rank"),
        pytest.param(["--set", "seed=5", "--set", "group_size=2"], ["group_size", "seed"], ["group_size", "seed"],
                     id="resume-two-changes"),
        pytest.param(["--set", "seed=5", "--set", "learning_rate=0.5", "--accept-recipe-changes"],
                     ["learning_rate", "seed"], ["seed"], id="resume-accepted-seed-change"),
        pytest.param(["--set", "model=tiny-cogvideox-random", "--accept-recipe-changes"], ["model"], ["model"],
                     id="resume-accepted-model-change"),
    ],
)
def test_resume_refuses_changes_it_cannot_honour(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], keys: list[str], fixed: list[str]) -> None:
    """Keys the checkpoint's state fixes (random state, tensors, batch shape) are refused even with
    --accept-recipe-changes: accepting them would be silently ignored."""
    recipe, run = run_copy
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume", *extra))
    line = assert_one_line_error(code, err, f"cannot resume '{run / 'checkpoint-2'}'", "another --output-dir")
    assert f"the recipe differs in {', '.join(keys)}, and a resumed run cannot take {', '.join(fixed)} " in line
    assert "--accept-recipe-changes" not in line
    assert snapshot(run) == before


def test_resume_refuses_a_changed_prompt_list(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    recipe, run = run_copy
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "one more prompt"}\n')
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume", "--set", "max_steps=3"))
    assert_one_line_error(code, err, "data.num_prompts", "data.prompts_sha256")
    assert snapshot(run) == before


def test_resume_accepted_changes_take_effect(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    """--accept-recipe-changes: the new learning rate, AdamW beta, EMA decay and prompt list are what the resumed
    run uses (not the checkpoint's restored values), and the accepted keys are recorded in metrics.jsonl."""
    from safetensors.torch import load_file

    recipe, run = run_copy
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "one more prompt"}\n')
    code, out, err = run_cli(capsys, train_argv(recipe, run, "--resume", "--set", "max_steps=3",
                                                "--set", "learning_rate=0.5", "--set", "adam_beta1=0.5",
                                                "--set", "ema_decay=0.5", "--accept-recipe-changes"))
    assert code == 0, err
    accepted = "adam_beta1,ema_decay,learning_rate,data.num_prompts,data.prompts_sha256"
    assert "resume: max_steps 2 -> 3" in out and f"accepted recipe changes in {accepted.replace(',', ', ')}" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # output_dir is a safe change too: the test resumes a copy of the run
    assert rows[2]["accepted_recipe_changes"] == accepted
    assert rows[2]["safe_recipe_changes"] == "max_steps,output_dir" and rows[2]["resumed_from_step"] == 2
    # the logged LR follows the new value (the recipe's was 1e-4 and the schedule is constant)
    assert rows[1]["lr/policy"] == pytest.approx(1e-4) and rows[2]["lr/policy"] == pytest.approx(0.5)
    ck2, ck3 = run / "checkpoint-2", run / "checkpoint-3"
    opt = torch.load(ck3 / "optimizers.pt", weights_only=True)["policy"]
    group = opt["optimizer"]["param_groups"][0]
    assert group["lr"] == group["initial_lr"] == 0.5 and group["betas"][0] == 0.5
    assert opt["scheduler"]["base_lrs"] == [0.5]
    # the step really took the new LR: Adam moves a weight by at most ~lr * (1 - beta1) / sqrt(1 - beta2) (3e-4
    # at lr 1e-4); at 0.5 the LoRA weights move by far more
    w2, w3 = load_file(str(ck2 / "trainable.safetensors")), load_file(str(ck3 / "trainable.safetensors"))
    assert max(float((w3[k] - w2[k]).abs().max()) for k in w2) > 0.01
    # the EMA the checkpoint did not have: the new decay, one update (diffusers' first update copies the weights)
    ema = torch.load(ck3 / "ema.pt", weights_only=True)["policy"]
    assert ema["decay"] == 0.5 and ema["optimization_step"] == 1
    sums = sorted(float(t.sum()) for t in ema["shadow_params"])
    assert sums == pytest.approx(sorted(float(t.sum()) for t in w3.values()), abs=1e-4)
    # the grown prompt list: a new epoch over all 5 prompts (2 drawn at step 3)
    order = torch.load(ck3 / "components.pt", weights_only=True)["prompt_sampler"]["order"]
    assert len(order) == 3 and max(order) <= 4


@pytest.mark.parametrize("exists", [False, True], ids=["resume-missing-dir", "resume-empty-dir"])
def test_resume_into_an_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str], exists: bool) -> None:
    out = tmp_path / "fresh"
    if exists:
        out.mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml")
    code, _, err = run_cli(capsys, train_argv(recipe, out, "--resume"))
    assert_one_line_error(code, err, "--resume", str(out), "nothing to resume")
    assert out.exists() == exists and (not exists or not any(out.iterdir()))


def test_damaged_checkpoint_blocks_a_fresh_run(run_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe, run = run_copy
    shutil.rmtree(run / "checkpoint-1")
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    before = snapshot(run)
    code, _, err = run_cli(capsys, train_argv(recipe, run))
    assert_one_line_error(code, err, str(run), "checkpoint-2", "--resume")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------------ lock
def test_output_dir_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str], reward_module: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".trl-video.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    before = snapshot(out)
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy")
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    assert_one_line_error(code, err, str(out), "in use by another run", f"pid {os.getpid()}", str(lock))
    assert snapshot(out) == before


def test_stale_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str], reward_module: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".trl-video.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy")
    code, out_text, err = run_cli(capsys, train_argv(recipe, out))
    assert code == 0, err
    assert f"removed the stale lock {out / '.trl-video.lock'}" in err and "done: 1 steps" in out_text
    assert not (out / ".trl-video.lock").exists()


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("at", [1, 3])  # 3: the interruption checkpoint is also a save_steps one, rotated away later
def test_sigterm_then_resume_is_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              reward_module: str, at: int) -> None:
    """SIGTERM (a real signal to this process, sent from inside the reward) at step ``at``: the step
    finishes, a checkpoint is written, exit 143; --resume then ends with weights equal to an uninterrupted
    run's and a metrics.jsonl without repeated steps."""
    import importlib

    from safetensors.torch import load_file

    mod = importlib.import_module(reward_module)
    max_steps = 4
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:sigterm_energy", max_steps=max_steps,
                          save_steps=3, save_total_limit=1, report_to="tensorboard")
    mod.KILL.update(at=None, calls=0)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "straight"))
    assert code == 0, err
    mod.KILL.update(at=at, calls=0)
    run = tmp_path / "interrupted"
    code, _, err = run_cli(capsys, train_argv(recipe, run))
    assert code == 128 + signal.SIGTERM, f"SIGTERM at step {at}: exit {code}\n{err}"
    assert "Traceback" not in err
    assert f"error: stopped by SIGTERM after step {at}: checkpoint {run / f'checkpoint-{at}'} written" in err
    record(code, next(line for line in err.splitlines() if line.startswith("error: ")))
    assert (run / f"checkpoint-{at}").is_dir() and not (run / "model").exists()
    # read now: with save_total_limit 1 the resumed run rotates this checkpoint away
    init = load_file(str(run / f"checkpoint-{at}" / "trainable.safetensors"))
    # TensorBoard reads a run's event files in name order, and a name starts with its creation second; a real resume
    # comes later, from another process. Here, within the same second and process, the name's last field (a
    # per-process counter, compared as text: "10" < "9") would decide, so start the resumed writer a second later.
    time.sleep(1.05)
    mod.KILL.update(at=None, calls=0)
    code, _, err = run_cli(capsys, train_argv(recipe, run, "--resume"))
    assert code == 0, err
    a = load_file(str(tmp_path / "straight" / f"checkpoint-{max_steps}" / "trainable.safetensors"))
    b = load_file(str(run / f"checkpoint-{max_steps}" / "trainable.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), (at, k)
    assert any(not torch.equal(init[k], b[k]) for k in b)  # the weights moved after resume
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1)), (at, rows)
    # TensorBoard's view of the run (both event files): every step once, the values metrics.jsonl holds
    scalars = tensorboard_scalars(run)
    assert "reward_mean" in scalars
    for tag, events in scalars.items():
        assert [s for s, _ in events] == list(range(1, max_steps + 1)), (at, tag, events)
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([r["reward_mean"] for r in rows], abs=1e-5)
    assert len(list((run / "tensorboard" / run.name).glob("events.out.tfevents.*"))) == 2


def test_sigint_is_a_stop_request_and_a_second_one_stops_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during training: the first SIGINT is turned into a stop request (no KeyboardInterrupt mid-step),
    a second one interrupts at once; the previous handlers come back afterwards."""
    from trl_video.runguard import StopSignals

    # an interactive process's handler: a test run started in the background by a non-interactive shell
    # inherits SIGINT ignored, and the second signal then (rightly) goes to that inherited SIG_IGN
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        first_survived = False
        with pytest.raises(KeyboardInterrupt):
            with StopSignals() as stop:
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.requested() == signal.SIGINT
                assert "received SIGINT: finishing this step and writing a checkpoint" in capsys.readouterr().err
                first_survived = True
                os.kill(os.getpid(), signal.SIGINT)
                pytest.fail("the second SIGINT did not interrupt")
        assert first_survived and signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_sigterm_real_subprocess(tmp_path: Path, reward_module: str) -> None:
    """The CLI as a user runs it, stopped from outside once it has logged a step."""
    import time

    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:latent_energy", max_steps=500)
    out = tmp_path / "out"
    env = subprocess_env(reward_module)
    proc = subprocess.Popen([*cli_command(), *train_argv(recipe, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(last) == 1 and "stopped by SIGTERM" in last[0] and "--resume" in last[0]
    record(proc.returncode, last[0])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    from trl_video.checkpointing import verify_checkpoint

    ck = out / f"checkpoint-{steps[-1]}"
    assert str(ck) in last[0] and verify_checkpoint(ck) is None
    assert not (out / ".trl-video.lock").exists()




# ------------------------------------------------------------------------------------------------ rewards / data
@pytest.mark.parametrize(
    ("fn", "culprits"),
    [
        pytest.param("list_reward", ["returned a list", "floating-point tensor of shape (2,)"], id="reward-returns-list"),
        pytest.param("int_reward", ["returned torch.int64 values"], id="reward-returns-int64"),
        pytest.param("str_reward", ["returned a list"], id="reward-returns-strings"),
        pytest.param("raising_reward", ["failed: ValueError: scoring service said no"], id="reward-raises"),
    ],
)
def test_bad_reward_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], reward_module: str, fn: str,
                            culprits: list[str]) -> None:
    name = f"{reward_module}:{fn}"
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=name)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, train_argv(recipe, out))
    assert_one_line_error(code, err, f"reward '{name}'", *culprits, glued_ok=True)
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "culprits"),
    [
        pytest.param("", ["is empty"], id="prompts-file-empty"),
        pytest.param('{"prompt": "a red circle"}\n{"prompt": "   "}\n{"prompt": ""}\n',
                     ["2 row(s) have no prompt text", "rows [1, 2]"], id="blank-prompts"),
        pytest.param('{"prompt": "a red circle"\n', ["cannot be read as json"], id="prompts-file-invalid-json"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                          culprits: list[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    recipe = write_recipe(tmp_path / "recipe.yaml", prompts=str(prompts))
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, str(prompts), *culprits)
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before and not (tmp_path / "out").exists()


def test_offline_latents_empty_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lat = tmp_path / "latents"
    save_offline_latents(str(lat), [], torch.zeros(0, *TINY_WAN_LATENT))
    recipe = write_recipe(tmp_path / "recipe.yaml", offline_latents=str(lat))
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "offline_latents", str(lat), "holds no rows")


def test_offline_latents_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lat = tmp_path / "latents"
    lat.mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml", offline_latents=str(lat))
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "offline_latents", str(lat), "empty folder")


def test_offline_latents_with_nan_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lat = tmp_path / "latents"
    x = torch.zeros(4, *TINY_WAN_LATENT)
    x[1, 0, 0, 0, 0] = float("nan")
    x[3, 2, 1, 0, 0] = float("inf")
    save_offline_latents(str(lat), [f"prompt {i}" for i in range(4)], x, rewards=torch.zeros(4))
    recipe = write_recipe(tmp_path / "recipe.yaml", method="fcrm", offline_latents=str(lat), replay="offline",
                          sampler_args={"num_steps": 2}, prompts_per_step=4)
    before = snapshot(lat)
    code, _, err = run_cli(capsys, train_argv(recipe, tmp_path / "out"))
    assert_one_line_error(code, err, "offline_latents", str(lat), "rows [", "NaN/inf", glued_ok=True)
    rows = re.search(r"rows \[([0-9, ]+)\]", err)
    assert rows is not None and sorted(int(r) for r in rows.group(1).split(",")) == [1, 3]
    assert snapshot(lat) == before


def test_broken_video_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, ["encode", "--videos", videos, "--model", "tiny-wan-random",
                                    "--out", tmp_path / "lat"])
    line = assert_one_line_error(code, err, "cannot read video", str(videos / "clip.mp4"))
    assert "ffmpeg version" not in err and "configuration:" not in err and len(line) < 400
    assert not (tmp_path / "lat").exists()


# ------------------------------------------------------------------------------------------------ secrets
def test_secrets_are_masked_where_recipes_are_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      reward_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key named like a secret is masked and a value from the environment is written as its reference: in the
    dry-run plan, trainer_state.json and the model card."""
    secret, env_value = "sk-literal-0123456789", "http://127.0.0.1:9/private-9876543210"
    monkeypatch.setenv("TRLV_TEST_ENDPOINT", env_value)
    recipe = write_recipe(tmp_path / "recipe.yaml", reward=f"{reward_module}:ServiceReward", save_model_at_end=True,
                          reward_args={"api_key": secret, "endpoint": "${env:TRLV_TEST_ENDPOINT}"})
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, train_argv(recipe, out, "--dry-run"))
    assert code == 0, err
    assert secret not in stdout + err and env_value not in stdout + err and "'api_key': '***'" in stdout
    code, stdout, err = run_cli(capsys, train_argv(recipe, out))
    assert code == 0, err
    assert secret not in stdout + err and env_value not in stdout + err
    written = [out / "checkpoint-1" / "trainer_state.json", out / "model" / "README.md"]
    for p in written:
        text = p.read_text()
        assert secret not in text and env_value not in text and "${env:TRLV_TEST_ENDPOINT}" in text, p
    state = json.loads(written[0].read_text())
    assert state["config"]["reward_args"] == {"api_key": "***", "endpoint": "${env:TRLV_TEST_ENDPOINT}"}


def test_redact_masks_secret_keys_everywhere() -> None:
    from trl_video.recipe_io import MASK, redact

    data = {"reward_args": {"api_key": "sk-1", "url": "http://x", "nested": [{"hf_token": "t"}]},
            "PASSWORD": "p", "client_secret": "s", "max_steps": 3, "lora_target_modules": ["to_q"]}
    out = redact(data, {"ENDPOINT": "http://x"})
    assert out["reward_args"]["api_key"] == MASK and out["reward_args"]["nested"][0]["hf_token"] == MASK
    assert out["PASSWORD"] == MASK and out["client_secret"] == MASK
    assert out["reward_args"]["url"] == "${env:ENDPOINT}" and out["max_steps"] == 3
    assert out["lora_target_modules"] == ["to_q"] and data["reward_args"]["api_key"] == "sk-1"
