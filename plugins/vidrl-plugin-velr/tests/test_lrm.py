"""LRM math: Huber loss, aggregation / variance, last-token pooling, shapes, save/load."""

import torch
from conftest import PROMPTS, SMALL_LRM
from torch import nn
from vidrl_plugin_velr.lrm import (
    LRMEnsemble,
    LRMReward,
    aggregate,
    auto_strides,
    huber_loss,
    last_token,
    member_variance,
    pearson,
)


def test_huber_matches_hand_computation():
    pred = torch.tensor([0.0, 0.0, 0.0, 1.0])
    target = torch.tensor([0.5, 2.0, -3.0, 1.0])
    # |d| = 0.5 -> 0.5*0.25 = 0.125 ; |d| = 2 -> 1*(2 - 0.5) = 1.5 ; |d| = 3 -> 1*(3 - 0.5) = 2.5 ; 0 -> 0
    assert torch.isclose(huber_loss(pred, target, 1.0), torch.tensor((0.125 + 1.5 + 2.5 + 0.0) / 4))
    # delta = 0.25: 0.25*(0.5-0.125)=0.09375 ; 0.25*(2-0.125)=0.46875 ; 0.25*(3-0.125)=0.71875
    assert torch.isclose(huber_loss(pred, target, 0.25), torch.tensor((0.09375 + 0.46875 + 0.71875) / 4))
    # exactly at the kink both branches agree (0.5 * delta^2)
    assert torch.isclose(huber_loss(torch.zeros(1), torch.ones(1) * 0.7, 0.7), torch.tensor(0.5 * 0.49))


def test_aggregation_and_variance_hand_made():
    preds = torch.tensor([[1.0, 2.0, -1.0], [3.0, 2.0, 0.0], [5.0, 2.0, 4.0]])  # [N=3, B=3]
    assert torch.allclose(aggregate(preds, "mean"), torch.tensor([3.0, 2.0, 1.0]))
    assert torch.allclose(aggregate(preds, "min"), torch.tensor([1.0, 2.0, -1.0]))
    assert torch.allclose(aggregate(preds, "max"), torch.tensor([5.0, 2.0, 4.0]))
    # population variance: ((1-3)^2 + 0 + (5-3)^2)/3 = 8/3 ; 0 ; ((-2)^2 + (-1)^2 + 3^2)/3 = 14/3
    assert torch.allclose(member_variance(preds), torch.tensor([8 / 3, 0.0, 14 / 3]))
    assert torch.allclose(member_variance(preds[:1]), torch.zeros(3))


class _Const(nn.Module):
    """A hand-made member: R(z, c) = scale * mean(z) + offset (ignores the text)."""

    def __init__(self, scale, offset):
        super().__init__()
        self.scale, self.offset = nn.Parameter(torch.tensor(scale)), offset

    def forward(self, z, text):
        return self.scale * z.flatten(1).mean(1) + self.offset


def test_reward_component_on_hand_made_ensemble(cog_policy):
    lrm = LRMReward(aggregation="min", **SMALL_LRM)
    lrm.ensure_built(cog_policy.latent_shape, 32)
    lrm.ensemble.members = nn.ModuleList([_Const(1.0, 0.0), _Const(2.0, 1.0), _Const(-1.0, 3.0)])
    lrm.attach_text_encoder(cog_policy.encode_prompts)
    z = torch.ones(2, *cog_policy.latent_shape) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1)
    z.requires_grad_(True)
    agg, var, members = lrm.predict(z, PROMPTS)
    # members: [1, 2], [3, 5], [2, 1]
    assert torch.allclose(members, torch.tensor([[1.0, 2.0], [3.0, 5.0], [2.0, 1.0]]))
    assert torch.allclose(agg, torch.tensor([1.0, 1.0]))
    assert torch.allclose(var, torch.tensor([2 / 3, 26 / 9]))  # [1,3,2] and [2,5,1]
    agg.sum().backward()  # gradient reaches the latents but never the LRM parameters
    assert z.grad is not None and all(p.grad is None for p in lrm.ensemble.parameters())
    assert all(p.requires_grad for p in lrm.ensemble.parameters())  # flags restored


def test_last_token_uses_the_mask():
    emb = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(last_token(emb, mask), torch.stack([emb[0, 1], emb[1, 3]]))


def test_members_independent_and_shapes(cog_policy):
    c, f, h, w = cog_policy.latent_shape
    ens = LRMEnsemble(3, seed=0, latent_channels=c, text_dim=32, latent_grid=(f, h, w), widths=(8, 8, 16), heads=2,
                      layers=1)
    w0 = [m.blocks[0].conv1.weight for m in ens.members]
    assert not torch.equal(w0[0], w0[1]) and not torch.equal(w0[1], w0[2])
    out = ens(torch.randn(2, c, f, h, w), torch.randn(2, 32))
    assert out.shape == (3, 2)
    assert ens.members[0].token_grid == (f, 2, 2)  # 8x8 latents -> 4x4 -> 2x2 (auto strides)
    assert auto_strides(13, 60, 90) == [(1, 2, 2), (1, 2, 2), (1, 2, 2)]
    # another resolution works through interpolated position tables
    assert ens(torch.randn(1, c, f + 2, 2 * h, 2 * w), torch.randn(1, 32)).shape == (3, 1)


def test_save_load_roundtrip(tmp_path, cog_policy):
    lrm = LRMReward(**SMALL_LRM)
    lrm.ensure_built(cog_policy.latent_shape, 32)
    lrm.save(tmp_path / "lrm", extra={"text_model": "tiny-cogvideox-random"})
    back = LRMReward(path=str(tmp_path / "lrm"))
    for enc in (lrm, back):
        enc.attach_text_encoder(cog_policy.encode_prompts)
    z = torch.randn(2, *cog_policy.latent_shape)
    assert torch.allclose(lrm(z, PROMPTS), back(z, PROMPTS))
    assert back.text_model == "tiny-cogvideox-random"


def test_pearson():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert abs(pearson(x, 2 * x + 1) - 1) < 1e-9 and abs(pearson(x, -x) + 1) < 1e-9
