"""A controlled DM-Align experiment that runs in a minute on CPU: ``trl-video bench dmalign.experiments toy``.

The data are an 8-mode Gaussian mixture on a circle (radius 3, std 0.25), shaped as latents ``[B, 2, 1, 1, 1]``.
A small MLP flow-matching teacher is trained on it; the K=4-step student is distilled from it with the plugin's
own :class:`~vidrl_plugin_dmalign.loss.DMAlignLoss`, the core ``fewstep`` sampler and the core ``group``
estimator, stepped exactly as ``VideoRewardTrainer`` steps them (sample with graph -> reward -> advantages ->
fake x5 on the detached batch -> generator on the graph). Only the policy is a stand-in (an MLP instead of a
diffusers transformer), which is what makes the distances exact enough to compare: MMD^2 with an RBF kernel
(bandwidth 0.5) on 4000 samples per set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from vidrl_plugin_dmalign.config import DMAlignConfig
from vidrl_plugin_dmalign.loss import DMAlignLoss

from trl_video import stats
from trl_video.components.base import TrainContext
from trl_video.components.estimators import GroupAdvantage
from trl_video.components.samplers import FewStepSampler
from trl_video.models.schedule import NoiseSchedule
from trl_video.sampling import fewstep_sample, ode_sample

N_MODES, RADIUS, STD = 8, 3.0, 0.25
MMD_BANDWIDTH = 0.5
SHAPE = (2, 1, 1, 1)


def modes() -> torch.Tensor:
    a = torch.arange(N_MODES) * 2 * math.pi / N_MODES
    return RADIUS * torch.stack([a.cos(), a.sin()], 1)


def sample_data(n: int, g: torch.Generator, which: list[int] | None = None) -> torch.Tensor:
    idx = torch.tensor(which)[torch.randint(len(which), (n,), generator=g)] if which else \
        torch.randint(N_MODES, (n,), generator=g)
    return (modes()[idx] + STD * torch.randn(n, 2, generator=g)).view(n, *SHAPE)


class ToyNet(nn.Module):
    """Velocity MLP v(x_t, t) with sinusoidal time features."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.freqs = nn.Parameter(torch.arange(1, 9).float() * math.pi, requires_grad=False)
        self.net = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: Any = None) -> torch.Tensor:
        tf = t.view(-1, 1) * self.freqs
        h = torch.cat([x_t.flatten(1), tf.sin(), tf.cos()], 1)
        return self.net(h).view_as(x_t)


class ToyPolicy:
    """The few things the loss and the core sampler use from a VideoPolicy."""

    def __init__(self, generator: nn.Module, teacher: nn.Module, latent_shape: tuple[int, ...] = SHAPE):
        self.transformer, self._frozen_reference = generator, teacher
        self.schedule = NoiseSchedule("flow")
        self.latent_shape = tuple(latent_shape)
        self.uses_lora = False

    def predict(self, x_t, t, emb, transformer=None):
        net = transformer if transformer is not None else self.transformer
        t = torch.as_tensor(t, dtype=torch.float32)
        return net(x_t, t.expand(x_t.shape[0]) if t.ndim == 0 else t)

    @contextlib.contextmanager
    def reference(self):
        yield self._frozen_reference

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1, 1), torch.ones(len(prompts), 1)

    def trainable_parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]


class ToyOffline:
    """Preferred latents (samples of the preferred modes) with the OfflineLatents interface the loss uses."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents
        self.ds = self

    def __getitem__(self, key: Any) -> Any:  # ds["prompt"] / ds[[rows]]["latents"], as a datasets.Dataset
        if key == "prompt":
            return ["toy"] * len(self.latents)
        return {"latents": self.latents[list(key)]}

    def next_batch(self, ctx: Any, n: int):
        idx = torch.randint(len(self.latents), (n,), generator=ctx.generator)
        return SimpleNamespace(latents=self.latents[idx])


def train_teacher(iters: int = 3000, seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    net = ToyNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        x0 = sample_data(512, g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(512, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
        loss = (net(x_t, t) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.requires_grad_(False)
    return net.eval()


@torch.no_grad()
def ode(net: nn.Module, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The core ODE sampler (:func:`trl_video.sampling.ode_sample`) with the MLP as the model."""
    policy = ToyPolicy(net, net, tuple(noise.shape[1:]))
    return ode_sample(policy, noise, torch.zeros(len(noise), 1, 1), policy.schedule.timesteps(steps))


@torch.no_grad()
def fewstep(net: nn.Module, noise: torch.Tensor, renoise: torch.Tensor, k_steps: int = 4) -> torch.Tensor:
    """The core few-step generator rule (:func:`trl_video.sampling.fewstep_sample`), re-noised with ``renoise[k-1]``."""
    policy = ToyPolicy(net, net, tuple(noise.shape[1:]))
    return fewstep_sample(policy, noise, torch.zeros(len(noise), 1, 1), [1 - k / k_steps for k in range(k_steps)],
                          lambda k, shape: renoise[k - 1])


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """MMD^2 of two toy sample sets at the toy's fixed bandwidth (:func:`trl_video.stats.mmd2`)."""
    return stats.mmd2(x, y, MMD_BANDWIDTH)


def reward_fn(x: torch.Tensor) -> torch.Tensor:
    """Group reward: the first coordinate (a linear, black-box reward; prefers the modes on the right)."""
    return x.flatten(1)[:, 0]


def distill(teacher: ToyNet, align: str, steps: int, lr: float, seed: int, preferred: torch.Tensor,
            batch: int = 64, group_size: int = 8, **cfg_kw: Any) -> tuple[ToyNet, list[dict]]:
    """DM-Align training of a 4-step student, stepped like VideoRewardTrainer.training_step."""
    torch.manual_seed(seed)
    gen = copy.deepcopy(teacher).requires_grad_(True).train()
    policy = ToyPolicy(gen, teacher)
    cfg = DMAlignConfig(align=align, **({"align_weight": 0.0} if align == "none" else {}), **cfg_kw)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                          autocast=contextlib.nullcontext)
    conf = SimpleNamespace(seed=seed, group_size=group_size, lora_target_modules=[], gradient_checkpointing=False)
    ctx = TrainContext(policy=policy, config=conf, accelerator=acc, reward=None, method_config=cfg,
                       generator=torch.Generator().manual_seed(seed + 1),
                       offline=ToyOffline(preferred) if align == "pair" else None)
    loss = DMAlignLoss()
    fake = loss.setup(ctx)["fake"].module
    opts = {"policy": torch.optim.AdamW(gen.parameters(), lr=lr, weight_decay=0.0),
            "fake": torch.optim.AdamW(fake.parameters(), lr=cfg.fake_lr or lr, weight_decay=0.0)}
    sampler, estimator = FewStepSampler(num_steps=4, grad=True), GroupAdvantage()
    hist = []
    for step in range(steps):
        ctx.step = step
        ctx.state.clear()
        prompts = ["toy"] * batch
        gids = torch.arange(batch // group_size).repeat_interleave(group_size)
        with torch.set_grad_enabled(loss.sample_grad):
            fresh = sampler.sample(ctx, prompts, policy.encode_prompts(prompts)[0], gids)
        fresh.rewards = reward_fn(fresh.latents.detach())
        fresh = estimator(ctx, fresh)
        detached = fresh.detach()
        for phase in loss.phases(step):
            for _ in range(phase.repeats):
                out, met = loss.compute(ctx, phase, fresh if phase.uses_graph else detached)
                out.backward()
                grp = phase.groups[0]
                params = gen.parameters() if grp == "policy" else fake.parameters()
                torch.nn.utils.clip_grad_norm_(list(params), 1.0)
                opts[grp].step()
                opts[grp].zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            hist.append({"step": step, "reward": float(fresh.rewards.mean()), **{k: round(v, 5) for k, v in met.items()}})
    return gen.requires_grad_(False).eval(), hist


def run(out: str = "out/dmalign_experiments", steps: int = 600, lr: float = 2e-4, n_eval: int = 4000,
        seed: int = 0, fake_lr: float = 1e-3, batch: int = 256) -> dict:
    t0 = time.time()
    cache = Path(out, f"toy_teacher_seed{seed}.pt")
    if cache.exists():
        teacher = ToyNet()
        teacher.load_state_dict(torch.load(cache, weights_only=True))
        teacher.requires_grad_(False).eval()
    else:
        teacher = train_teacher(seed=seed)
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), cache)
    g = torch.Generator().manual_seed(1234)
    noise, noise_b = torch.randn(n_eval, *SHAPE, generator=g), torch.randn(n_eval, *SHAPE, generator=g)
    renoise = torch.randn(3, n_eval, *SHAPE, generator=g)
    t50, t50b = ode(teacher, noise, 50), ode(teacher, noise_b, 50)
    preferred_modes = [0, 1]  # the 'preferred set': real samples of two of the eight modes (right / upper right)
    pref_train = sample_data(2000, torch.Generator().manual_seed(7), preferred_modes)
    pref_eval = sample_data(n_eval, torch.Generator().manual_seed(8), preferred_modes)
    data_eval = sample_data(n_eval, torch.Generator().manual_seed(9))

    def stats(x: torch.Tensor) -> dict:
        d = torch.cdist(x.flatten(1), modes())
        near = d.min(1).values < 3 * STD
        return {"mmd2_teacher50": mmd2(x, t50), "mmd2_preferred": mmd2(x, pref_eval), "mmd2_data": mmd2(x, data_eval),
                "reward": float(reward_fn(x).mean()), "on_mode_frac": float(near.float().mean()),
                "preferred_mode_frac": float((near & torch.isin(d.argmin(1), torch.tensor(preferred_modes)))
                                             .float().mean())}

    res: dict[str, Any] = {
        "teacher 50-step ODE (indep. noise = noise floor)": {"nfe": 50, **stats(t50b)},
        "teacher 4-step ODE": {"nfe": 4, **stats(ode(teacher, noise, 4))},
        "teacher as 4-step fewstep generator (student init)": {"nfe": 4, **stats(fewstep(teacher, noise, renoise))},
        "data (ground truth)": {"nfe": 0, **stats(data_eval)},
    }
    common = {"fake_lr": fake_lr}
    runs = {"DMD only (align weight 0)": ("none", common), "DM-Align (Pair)": ("pair", common),
            "DM-Align (Group)": ("group", {"top_n": 2, **common})}
    for name, (align, kw) in runs.items():
        student, hist = distill(teacher, align, steps, lr, seed, pref_train, batch=batch, **kw)
        res[name] = {"nfe": 4, **stats(fewstep(student, noise, renoise)), "history": hist}
    res["DM-Align (Group, flipped sign: ablation)"] = {"nfe": 4, **stats(fewstep(
        distill(teacher, "group", steps, lr, seed, pref_train, batch=batch, top_n=2, group_sign="flipped",
                **common)[0], noise, renoise))}
    res["_meta"] = {"steps": steps, "lr": lr, "fake_lr": fake_lr, "batch": batch, "group_size": 8, "n_eval": n_eval, "seed": seed, "seconds": round(time.time() - t0, 1),
                    "mmd_bandwidth": 0.5, "preferred_modes": preferred_modes, "reward": "x[0] (first coordinate)"}
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"toy_results_seed{seed}.json").write_text(json.dumps(res, indent=2))
    return res


def toy_table(res: dict) -> str:
    rows = ["| model | NFE | MMD^2 to teacher-50 | MMD^2 to preferred set | reward x[0] | on-mode | on preferred modes |",
            "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if name.startswith("_"):
            continue
        rows.append(f"| {name} | {r['nfe']} | {r['mmd2_teacher50']:.4f} | {r['mmd2_preferred']:.4f} | "
                    f"{r['reward']:.3f} | {r['on_mode_frac']:.3f} | {r['preferred_mode_frac']:.3f} |")
    return "\n".join(rows)
