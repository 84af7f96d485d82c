import torch
import vidrl_plugin_example_reward as plugin

from trl_video.plugins import Registry, make_plugin_manager


def test_warmth_orders_red_above_blue() -> None:
    red = torch.full((1, 3, 3, 4, 4), -1.0)
    red[:, 0] = 1.0
    blue = torch.full((1, 3, 3, 4, 4), -1.0)
    blue[:, 2] = 1.0
    reward = plugin.WarmthReward()
    assert reward(red, ["x"]).item() == 1.0
    assert reward(blue, ["x"]).item() == -1.0


def test_registers_through_the_hook() -> None:
    pm, broken = make_plugin_manager(load_entrypoints=False, extra_plugins=[plugin])
    reg = Registry(pm, broken)
    assert "warmth" in reg.names("reward") and not reg.broken
