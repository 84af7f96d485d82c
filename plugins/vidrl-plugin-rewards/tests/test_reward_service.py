"""The reward service over a real uvicorn server on loopback: round trip, batching, and every fault as a
one-line error naming the URL, with checkpoints left as they were."""

from __future__ import annotations

import copy
import hashlib
import socket
import time
from pathlib import Path

import pytest
import torch
from vidrl_plugin_rewards.service import BackgroundServer, HttpReward, build_app

from trl_video.components.rewards import LuminanceReward
from trl_video.errors import TrlVideoError

PROMPTS = ["a red circle moving left on a dark background", "a blue square moving up on a light background"]


class Recorder:
    """Luminance, with the batch sizes it was asked for; ``mode`` switches on a fault."""

    space = "pixel"
    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.mode = "ok"

    def __call__(self, inputs, prompts):
        self.batches.append(len(prompts))
        r = LuminanceReward()(inputs, prompts)
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "shape":
            return r[:-1]
        if self.mode == "nan":
            r[0] = float("nan")
        return r


@pytest.fixture
def served():
    rec = Recorder()
    srv = BackgroundServer(build_app(rec, max_batch=4)).start()
    yield srv, rec
    srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def video(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_round_trip_equals_local_reward_in_batches(served):
    srv, rec = served
    client = HttpReward(srv.url, batch_size=2)
    assert client.space == "pixel" and client.remote_name == "recorder" and not client.differentiable
    v = video(5)
    got = client(v, [PROMPTS[i % 2] for i in range(5)])
    torch.testing.assert_close(got, LuminanceReward()(v.half().float(), []), atol=1e-6, rtol=0)
    assert rec.batches == [2, 2, 1]


def _one_line(exc: pytest.ExceptionInfo, url: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and url in msg
    return msg


def test_server_down_at_start_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrlVideoError) as exc:
        HttpReward(url, retries=1, backoff=0.01)
    assert "cannot connect" in _one_line(exc, url) and "after 2 attempts" in str(exc.value)


def test_slow_server_times_out(served):
    srv, rec = served
    client = HttpReward(srv.url, timeout=0.3, retries=1, backoff=0.01)
    rec.mode = "slow"
    t0 = time.perf_counter()
    with pytest.raises(TrlVideoError) as exc:
        client(video(2), PROMPTS)
    assert "timeout" in _one_line(exc, srv.url)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("mode,text", [("shape", "returned shape (1,) for 2 samples"),
                                       ("nan", "returned NaN/inf for samples [0]")])
def test_wrong_shape_and_nan_are_refused(served, mode, text):
    srv, rec = served
    rec.mode = mode
    with pytest.raises(TrlVideoError) as exc:
        HttpReward(srv.url)(video(2), PROMPTS)
    assert text in _one_line(exc, srv.url)


def test_oversized_batch_is_a_client_error(served):
    srv, _ = served
    with pytest.raises(TrlVideoError, match="413 batch 5 > max_batch 4"):
        HttpReward(srv.url, batch_size=5)(video(5), PROMPTS * 2 + PROMPTS[:1])


# ------------------------------------------------------------------------------------------------ in training
def _recipe(url: str, out: Path, **kw) -> dict:
    rec = dict(model="tiny-wan-random", method="fcrm", reward=url, max_steps=2, prompts_per_step=2, group_size=2,
               sampler_args={"num_steps": 2}, output_dir=str(out), report_to="none", save_model_at_end=False,
               score_async=True, seed=0)
    rec.update(kw)
    return rec


@pytest.fixture(scope="module")
def base_policy():
    from trl_video.models.policy import load_policy

    return load_policy("tiny-wan-random")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fcrm_trains_against_http_reward_overlapped(served, base_policy, tmp_path):
    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    srv, rec = served
    tr = VideoRewardTrainer(config_from_dict(_recipe(srv.url, tmp_path / "run", save_steps=1)),
                            policy=copy.deepcopy(base_policy))
    before = {n: p.detach().clone() for n, p in tr.policy.transformer.named_parameters() if p.requires_grad}
    tr.train()
    assert [r["step"] for r in tr.history] == [1, 2] and all("reward_mean" in r for r in tr.history)
    changed = sum(not torch.equal(before[n], p) for n, p in tr.policy.transformer.named_parameters() if n in before)
    assert changed > 0
    assert rec.batches == [4, 4]  # two steps of 2x2 samples, no prefetch past the last step
    comps = torch.load(tmp_path / "run" / "checkpoint-1" / "components.pt", weights_only=True)
    assert len(comps["prefetched"]["prompts"]) == 4  # step 2's batch, sampled while step 1 was scored


def test_server_dies_mid_run_leaves_checkpoint_intact(served, base_policy, tmp_path):
    from transformers import TrainerCallback

    from trl_video.config import config_from_dict
    from trl_video.trainer import VideoRewardTrainer

    srv, _ = served
    seen: dict[str, dict[str, str]] = {}

    class KillServer(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            seen["ckpt"] = _digest(tmp_path / "run" / "checkpoint-1")
            srv.stop()

    tr = VideoRewardTrainer(config_from_dict(_recipe(srv.url, tmp_path / "run", max_steps=3, save_steps=1)),
                            policy=copy.deepcopy(base_policy), callbacks=[KillServer()])
    tr.ctx.reward.retries, tr.ctx.reward.backoff = 1, 0.01
    with pytest.raises(TrlVideoError) as exc:
        tr.train()
    assert "cannot connect" in _one_line(exc, srv.url)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert _digest(tmp_path / "run" / "checkpoint-1") == seen["ckpt"]


def test_cli_server_down_is_one_line_and_saves_nothing(tmp_path, capsys):
    import yaml

    from trl_video import cli

    url = f"http://127.0.0.1:{free_port()}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(url, tmp_path / "out", reward_args={"retries": 0})))
    assert cli.main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: reward server " + url)
    assert not (tmp_path / "out").exists()
