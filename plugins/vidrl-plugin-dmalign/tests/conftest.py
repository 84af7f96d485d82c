"""Shared fixtures: analytic Gaussian 'score models' and a stub TrainContext, so the loss's maths can be
checked against closed forms independently of any neural network."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from trl_video.bench_discovery import import_benchmark
from trl_video.components.base import TrainContext

ToyPolicy = import_benchmark("dmalign", "toy").ToyPolicy  # the toy study's stand-in policy (benchmarks/dmalign)

torch.set_num_threads(1)  # the CI machine is shared; 1 thread is faster than 2 contended ones


class GaussianDenoiser(nn.Module):
    """Exact flow-matching model of data ~ N(m, v I): native velocity whose x0 is E[x0 | x_t]."""

    def __init__(self, m: torch.Tensor, v: float):
        super().__init__()
        self.m, self.v = m, v

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (1 - t).view(-1, *[1] * (x_t.ndim - 1)), t.view(-1, *[1] * (x_t.ndim - 1))
        return self.m + a * self.v / (a**2 * self.v + s**2) * (x_t - a * self.m)

    def score(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (1 - t).view(-1, *[1] * (x_t.ndim - 1)), t.view(-1, *[1] * (x_t.ndim - 1))
        return -(x_t - a * self.m) / (a**2 * self.v + s**2)

    def forward(self, x_t, t):
        s = t.view(-1, *[1] * (x_t.ndim - 1))
        return (x_t - self.posterior_mean(x_t, t)) / s  # flow: x0 = x_t - t * native


class ParamGenerator(nn.Module):
    """G(x_t) = theta + c * x_t (theta learnable): x0 of the 'generator' as a flow-velocity output."""

    def __init__(self, theta: torch.Tensor, c: float = 0.0):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.c = c

    def forward(self, x_t, t):
        s = t.view(-1, *[1] * (x_t.ndim - 1))
        return (x_t - (self.theta + self.c * x_t)) / s


class StubOffline:
    def __init__(self, prompts, latents):
        self.prompts, self.latents = list(prompts), latents
        self.ds = self

    def __getitem__(self, key):
        if key == "prompt":
            return self.prompts
        return {"latents": self.latents[list(key)]}

    def next_batch(self, ctx, n):
        return SimpleNamespace(latents=self.latents[:n])


def make_ctx(generator: nn.Module, real: nn.Module, latent_shape, method_config, seed: int = 0, offline=None,
             group_size: int = 4) -> TrainContext:
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                          autocast=contextlib.nullcontext)
    cfg = SimpleNamespace(seed=0, group_size=group_size, lora_target_modules=["to_q"], gradient_checkpointing=False)
    return TrainContext(policy=ToyPolicy(generator, real, latent_shape), config=cfg, accelerator=acc, reward=None,
                        method_config=method_config, generator=torch.Generator().manual_seed(seed), offline=offline)


@pytest.fixture
def stub():
    return SimpleNamespace(GaussianDenoiser=GaussianDenoiser, ParamGenerator=ParamGenerator, make_ctx=make_ctx,
                           StubOffline=StubOffline)
