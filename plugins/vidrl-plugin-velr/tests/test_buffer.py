"""Variance-organised replay buffer: eviction and sampling probabilities."""

import torch
from vidrl_plugin_velr.buffer import VarianceReplayBuffer


def _ins(buf, variances, tag):
    n = len(variances)
    buf.insert(torch.full((n, 1, 1, 1, 1), float(ord(tag))), [f"{tag}-{i}" for i in range(n)], torch.arange(n).float(),
               torch.tensor(variances))


def test_new_samples_evict_lowest_variance_old():
    buf = VarianceReplayBuffer(4)
    _ins(buf, [0.1, 0.5, 0.2, 0.9], "a")
    _ins(buf, [0.05, 0.3], "b")
    # the two lowest-variance OLD items (0.1, 0.2) leave; the new ones always enter (even the 0.05 one)
    assert sorted(buf.prompts) == ["a-1", "a-3", "b-0", "b-1"]
    assert torch.allclose(buf.variances.sort().values, torch.tensor([0.05, 0.3, 0.5, 0.9]))
    assert len(buf) == 4 and buf.latents.shape[0] == 4


def test_top_admission_keeps_highest_variance_overall():
    buf = VarianceReplayBuffer(4, admit="top")
    _ins(buf, [0.1, 0.5, 0.2, 0.9], "a")
    _ins(buf, [0.05, 0.3], "b")
    assert sorted(buf.prompts) == ["a-1", "a-2", "a-3", "b-1"]


def test_batch_larger_than_capacity_keeps_top_new():
    buf = VarianceReplayBuffer(2)
    _ins(buf, [0.4], "a")
    _ins(buf, [0.1, 0.7, 0.3], "b")
    assert sorted(buf.prompts) == ["b-1", "b-2"]


def test_sampling_probabilities_proportional_to_variance():
    buf = VarianceReplayBuffer(8)
    _ins(buf, [1.0, 2.0, 3.0, 4.0], "a")
    assert torch.allclose(buf.probabilities(), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    idx = buf.sample(40000, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).float() / 40000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.01)


def test_state_dict_roundtrip():
    buf = VarianceReplayBuffer(4)
    _ins(buf, [0.1, 0.5], "a")
    other = VarianceReplayBuffer(4)
    other.load_state_dict(buf.state_dict())
    assert other.prompts == buf.prompts and torch.equal(other.latents, buf.latents)
    assert torch.equal(other.variances, buf.variances) and torch.equal(other.rewards, buf.rewards)
