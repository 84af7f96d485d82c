"""Typed component interfaces: Protocols with their flags, defaults for components that predate them, typed
``Rollouts`` fields (with the former ``extras`` keys still readable), and the narrow ``TrainContext``."""

from __future__ import annotations

import warnings

import pytest
import torch

from trl_video.components.base import (
    BaseLoss,
    BaseReplay,
    Estimator,
    Loss,
    Phase,
    Replay,
    Reward,
    Sampler,
    ensure_interface,
)
from trl_video.errors import PluginError
from trl_video.rollouts import Rollouts


def test_builtins_satisfy_their_protocols() -> None:
    from trl_video.components.estimators import BUILTIN_ESTIMATORS
    from trl_video.components.replay import BUILTIN_REPLAYS
    from trl_video.components.rewards import BUILTIN_REWARDS
    from trl_video.components.samplers import BUILTIN_SAMPLERS
    from trl_video.methods.refl import ReFLLoss

    for protocol, table in ((Sampler, BUILTIN_SAMPLERS), (Estimator, BUILTIN_ESTIMATORS),
                            (Replay, BUILTIN_REPLAYS), (Reward, BUILTIN_REWARDS)):
        for name, cls in table.items():
            assert isinstance(cls(), protocol), (protocol.__name__, name)
    loss = ReFLLoss()
    assert isinstance(loss, Loss) and loss.sample_grad is True and loss.reward_grad is True
    assert BUILTIN_REPLAYS["offline"]().needs_rollouts is False and BUILTIN_REPLAYS["fifo"]().needs_rollouts is True


def test_base_classes_carry_the_flag_defaults() -> None:
    class MyLoss(BaseLoss):
        def compute(self, ctx, phase, batch):
            return torch.zeros(()), {}

    loss = MyLoss()
    assert (loss.sample_grad, loss.reward_grad) == (False, False)
    assert loss.phases(0) == [Phase("policy")] and loss.setup(None) == {}  # type: ignore[arg-type]
    assert BaseReplay().needs_rollouts is True and BaseReplay().state_dict() == {}


def test_a_component_without_flags_gets_the_defaults_with_a_deprecation_warning() -> None:
    class OldLoss:  # written before the flags were part of the interface
        def setup(self, ctx):
            return {}

        def phases(self, step):
            return [Phase("policy")]

        def compute(self, ctx, phase, batch):
            return torch.zeros(()), {}

    with pytest.warns(DeprecationWarning, match="does not declare 'sample_grad'"):
        loss = ensure_interface("loss", OldLoss(), "old")
    assert loss.sample_grad is False and loss.reward_grad is False

    class HalfReplay:
        def sample(self, ctx, fresh):
            return fresh

    with pytest.raises(PluginError, match="replay 'half' .* lacks update"):
        ensure_interface("replay", HalfReplay(), "half")


def test_registry_create_checks_the_interface() -> None:
    import types

    from trl_video import hookimpl
    from trl_video.plugins import Registry, make_plugin_manager

    class NotASampler:
        pass

    @hookimpl
    def trl_video_register_samplers(register):
        register("nothing", NotASampler)

    plugin = types.SimpleNamespace(__name__="bad_sampler_plugin", trl_video_register_samplers=trl_video_register_samplers)
    reg = Registry(*make_plugin_manager(load_entrypoints=False, extra_plugins=[plugin]))
    with pytest.raises(PluginError, match="sampler 'nothing' .* lacks sample"):
        reg.create("sampler", "nothing")


def _batch(n: int = 4) -> Rollouts:
    return Rollouts(latents=torch.randn(n, 2, 1, 2, 2), prompts=[f"p{i}" for i in range(n)],
                    t_mid=torch.arange(n).float(), window_start=torch.arange(n), eta=0.7,
                    extras={"mine": torch.arange(n) * 10, "note": "kept"})


def test_typed_fields_follow_select_detach_and_cat() -> None:
    b = _batch()
    s = b.select([3, 1])
    assert s.t_mid.tolist() == [3.0, 1.0] and s.window_start.tolist() == [3, 1] and s.eta == 0.7
    assert s.extras["mine"].tolist() == [30, 10] and s.extras["note"] == "kept"
    c = Rollouts.cat([b.select([0]), b.select([2])])
    assert c.t_mid.tolist() == [0.0, 2.0] and c.eta == 0.7 and c.extras["mine"].tolist() == [0, 20]
    assert Rollouts.cat([b.select([0]), b.select([1]).with_(eta=0.1)]).eta is None  # batch-level: differs
    assert b.detach().with_(rewards=torch.ones(4)).t_mid is not None


def test_former_extras_keys_still_read_and_write_the_typed_fields() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        b = Rollouts(latents=torch.zeros(2, 1, 1, 1, 1), prompts=["a", "b"],
                     extras={"t_mid": torch.tensor([0.5, 0.5]), "eta": torch.tensor(1.0)})
        assert b.t_mid is not None and b.t_mid.tolist() == [0.5, 0.5] and b.eta == 1.0
        assert "t_mid" in b.extras and "x_last" not in b.extras
        assert torch.equal(b.extras["t_mid"], b.t_mid) and float(b.extras["eta"]) == 1.0
        b.extras["branch_step"] = torch.tensor([2, 2])
        assert b.branch_step.tolist() == [2, 2] and b.select([1]).branch_step.tolist() == [2]
        with pytest.raises(KeyError):
            _ = b.extras["x_last"]
    with pytest.warns(DeprecationWarning, match="typed field Rollouts.t_mid"):
        _ = b.extras["t_mid"]
    assert "t_mid" not in dict(b.extras.items())  # stored once, in the field


def test_context_builds_rewards_without_the_registry(tmp_path) -> None:
    """A loss needing a second reward (VELR's true pixel reward) asks the context, not the registry."""
    from trl_video.config import VideoRewardConfig
    from trl_video.trainer import VideoRewardTrainer

    cfg = VideoRewardConfig(model="tiny-wan-random", method="refl", reward="luminance", output_dir=str(tmp_path),
                            report_to="none", max_steps=1, prompts_per_step=1, group_size=1,
                            sampler_args={"num_steps": 2, "grad_steps": 1})
    tr = VideoRewardTrainer(cfg)
    assert tr.ctx.sampler is tr.sampler
    r = tr.ctx.build_reward("motion+luminance", {})
    assert r.space == "pixel" and type(r).__name__ == "WeightedSum"
