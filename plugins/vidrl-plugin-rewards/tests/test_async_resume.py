"""Resume with an overlapped (``score_async``) reward: the batch sampled for step k+1 while step k was scored is
saved in checkpoint-k and scored first after ``--resume``, so an interrupted run ends with the same weights as an
uninterrupted one, bit for bit (CPU) -- for a checkpoint at step k and for a real SIGTERM during scoring."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trl_video.callbacks import StopAfterStep

MAX_STEPS, STOP = 3, 2

REWARD_MODULE = textwrap.dedent("""
    import os
    import signal
    import threading

    KILL = {"at": None, "calls": 0, "threads": []}

    def energy(inputs, prompts):  # a latent reward that can send this process a real SIGTERM on its at-th call
        KILL["calls"] += 1
        KILL["threads"].append(threading.current_thread().name)
        if KILL["calls"] == KILL["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return -(inputs.float() ** 2).flatten(1).mean(1)

    energy.space = "latent"
    energy.differentiable = False
""")


def _recipe(out: Path) -> dict:
    return dict(model="tiny-wan-random", method="fcrm", reward="async_resume_reward:energy", max_steps=MAX_STEPS,
                save_steps=1, prompts_per_step=2, group_size=2, sampler_args={"num_steps": 2}, output_dir=str(out),
                report_to="none", save_model_at_end=False, score_async=True, learning_rate=1e-2, seed=0)


class Recorder:
    """Wraps the run's reward: the inputs of every batch it scores, in order."""

    def __init__(self, reward):
        self.reward, self.space, self.differentiable = reward, reward.space, reward.differentiable
        self.seen: list[torch.Tensor] = []

    def __call__(self, inputs, prompts):
        self.seen.append(inputs.detach().clone())
        return self.reward(inputs, prompts)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reward module on sys.path, the recipe, and an uninterrupted CLI run (the reference)."""
    import sys

    from trl_video import cli

    root = tmp_path_factory.mktemp("async_resume")
    (root / "async_resume_reward.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    import async_resume_reward as mod

    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(root / "unused")))
    mod.KILL.update(at=None, calls=0, threads=[])
    code = cli.main(["train", "--recipe", str(recipe), "--output-dir", str(root / "straight")])
    assert code == 0
    assert all(t.startswith("trl-video-score") for t in mod.KILL["threads"])  # scored in the worker thread
    try:
        yield dict(root=root, recipe=recipe, mod=mod,
                   weights=load_file(str(root / "straight" / f"checkpoint-{MAX_STEPS}" / "trainable.safetensors")))
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("async_resume_reward", None)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_checkpoint_with_prefetched_batch_is_bit_identical(straight, tmp_path):
    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    def trainer(out: Path, **kw):
        tr = VideoRewardTrainer(config_from_dict(_recipe(out)), **kw)
        tr.ctx.reward = rec = Recorder(tr.ctx.reward)
        return tr, rec

    first, rec1 = trainer(tmp_path / "run", callbacks=[StopAfterStep(STOP)])
    first.train()
    assert first.global_step == STOP
    comps = torch.load(tmp_path / "run" / f"checkpoint-{STOP}" / "components.pt", weights_only=True)
    assert "prefetched" in comps  # step 3's batch, sampled while step 2 was scored
    resumed, rec2 = trainer(tmp_path / "run", resume=True)
    resumed.train()
    assert resumed.global_step == MAX_STEPS
    # the saved batch is what the resumed run scored first (latent reward: the reward sees the latents)
    assert torch.equal(rec2.seen[0], comps["prefetched"]["latents"])
    assert len(rec1.seen) == STOP and len(rec2.seen) == MAX_STEPS - STOP  # nothing sampled past the last step
    ours = load_file(str(tmp_path / "run" / f"checkpoint-{MAX_STEPS}" / "trainable.safetensors"))
    assert _equal(straight["weights"], ours)
    mid = load_file(str(tmp_path / "run" / f"checkpoint-{STOP}" / "trainable.safetensors"))
    assert not _equal(mid, ours)  # the resumed run did train


def test_sigterm_during_overlapped_scoring_then_resume_is_bit_identical(straight, tmp_path, capsys):
    """A real SIGTERM sent from the scoring worker thread while step 2 is scored (step 3's batch being sampled
    meanwhile): the step finishes, checkpoint-2 holds the prefetched batch, exit 143; ``--resume`` ends equal."""
    from trl_video import cli

    def train(out: Path, *extra: str) -> tuple[int, str]:
        code = cli.main(["train", "--recipe", str(straight["recipe"]), "--output-dir", str(out), *extra])
        return code, capsys.readouterr().err

    mod, run = straight["mod"], tmp_path / "interrupted"
    mod.KILL.update(at=STOP, calls=0)
    code, err = train(run)
    assert code == 128 + signal.SIGTERM, err
    assert f"stopped by SIGTERM after step {STOP}" in err and "Traceback" not in err
    assert "prefetched" in torch.load(run / f"checkpoint-{STOP}" / "components.pt", weights_only=True)
    mod.KILL.update(at=None, calls=0)
    code, err = train(run, "--resume")
    assert code == 0, err
    assert _equal(straight["weights"], load_file(str(run / f"checkpoint-{MAX_STEPS}" / "trainable.safetensors")))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))
