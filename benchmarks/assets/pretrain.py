"""Reproduce the shipped base checkpoints ``trl_video/assets/tiny-wan`` and ``trl_video/assets/tiny-cogvideox``.

``trl-video pretrain --family wan --out trl_video/assets/tiny-wan`` (from a checkout; = ``trl-video bench assets.pretrain``)
trains the real diffusers architectures built by :func:`trl_video.models.presets.build_random` on the
embedded synthetic world, in two stages, on CPU:

* **Stage A, VAE**: L1 reconstruction (+ a tiny KL on the posterior) on freshly rendered train-split clips.
  Afterwards the latent statistics are measured and written into the VAE config so that the normalised
  latents the policy hands to the transformer are about N(0, 1): Wan gets per-channel
  ``latents_mean``/``latents_std``; CogVideoX gets a single ``scaling_factor`` (1 / RMS of the latents,
  which equals 1 / std when the latents are centred; the family has no mean shift).
* **Stage B, transformer**: a fixed pool of train-split clips is encoded once (deterministic ``mode()``)
  and the transformer is trained from scratch with the family's native objective
  (``MSE(predict(x_t, t, emb), schedule.target(x0, eps, t))``: flow velocity for Wan, v for CogVideoX),
  with 10% of the prompts dropped to the empty prompt so classifier-free guidance works. The saved
  transformer holds the EMA weights.

The frozen tiny text encoder and tokenizer are kept as built (random, frozen: they only need to tell words
apart). The result is saved with :meth:`VideoPolicy.save_pretrained` plus ``pretrain_report.json``, which
holds losses, timings and an evaluation on the held-out captions (colour / motion / background of the
decoded samples, for the trained model and for random weights). A PNG of samples is written outside the
assets folder (``/tmp/pretrain_<family>_samples.png`` by default) so the package stays small.
Deterministic by ``seed`` (on a given machine / thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import trl_video
from trl_video import world

FAMILIES = ("wan", "cogvideox")

#: Defaults per family (sized for ~15-20 minutes per family on 2 CPU cores).
DEFAULTS: dict[str, dict[str, Any]] = {
    # Wan's VAE (RMS-norm, causal) learns the shapes' colour slowly: single-frame pretraining (cheap) with a
    # chroma loss first, then clips.
    "wan": dict(vae_image_iters=1500, vae_iters=400, vae_lr=5e-4, chroma_weight=3.0, mse_weight=0.0,
                zero_init_attention=True, dit_iters=10000),
    "cogvideox": dict(vae_image_iters=0, vae_iters=600, vae_lr=1e-3, chroma_weight=0.0, mse_weight=1.0,
                      zero_init_attention=False, dit_iters=5000),
}

_POOL_SEED_BASE = 1_000_000  # clip seeds of the encoded transformer pool
_EVAL_SEED_BASE = 9_000_000  # clip / noise seeds of the evaluation (never used in training)


# ---------------------------------------------------------------------------------------------- helpers
def _cosine_with_warmup(warmup: int, total: int, floor: float = 0.1):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return fn


def _render(caps: list[world.Caption], seeds: list[int]) -> Tensor:
    return torch.stack([torch.from_numpy(world.render(c, int(s))) for c, s in zip(caps, seeds)])


def _random_clips(rng: np.random.Generator, caps: list[world.Caption], n: int) -> Tensor:
    idx = rng.integers(0, len(caps), size=n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return _render([caps[i] for i in idx], list(seeds))


def _tqdm(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


def _log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def _vae_latent_dist(vae, x: Tensor):
    return vae.encode(x).latent_dist


# ---------------------------------------------------------------------------------------------- stage A
def _foreground(x: Tensor) -> Tensor:
    """``[B, 1, F, H, W]`` mask of coloured (non-grey) pixels: the world's backgrounds are grey."""
    return ((x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) > 0.5).to(x.dtype)


def decode_unclamped(vae, z: Tensor) -> Tensor:
    """The VAE decoder's output *before* Wan's final clamp to [-1, 1], for training.

    ``AutoencoderKLWan.decode`` clamps its output, which zeroes the gradient of every pixel that overshoots the
    range: early in training whole regions (and the shapes in them) sit outside [-1, 1] and are never learned
    (the VAE settles on background-only reconstructions). CogVideoX's decoder does not clamp. Mirrors
    diffusers 0.42's ``AutoencoderKLWan._decode`` (no tiling / patching at these sizes); equal to ``decode``
    up to the clamp.
    """
    if type(vae).__name__ != "AutoencoderKLWan" or vae.config.patch_size is not None:
        return vae.decode(z).sample
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


def zero_init_vae_attention(vae) -> int:
    """Zero the output projection of the Wan VAE's attention blocks (a standard zero-init of residual
    branches): at random init their global mixing swamps the local conv path. Returns how many were zeroed."""
    n = 0
    for m in vae.modules():
        if type(m).__name__ == "WanAttentionBlock":
            torch.nn.init.zeros_(m.proj.weight)
            torch.nn.init.zeros_(m.proj.bias)
            n += 1
    return n


def _chroma(x: Tensor) -> Tensor:
    return x - x.mean(1, keepdim=True)


def train_vae(policy, *, iters: int, batch_size: int, lr: float, kl_weight: float, rng: np.random.Generator,
              log_every: int, warmup: int = 50, fg_weight: float = 4.0, sample_posterior: bool = False,
              mse_weight: float = 0.0, l1_weight: float = 1.0, chroma_weight: float = 0.0,
              frames: int | None = None, name: str = "vae") -> dict[str, Any]:
    """L1 reconstruction (+ ``kl_weight`` x KL summed over latent elements) on fresh train-split clips.

    * The shape covers ~10% of the pixels, so the loss is re-weighted by ``1 + fg_weight`` on coloured pixels
      (otherwise a background-only reconstruction is a strong local minimum).
    * ``chroma_weight``: an extra L1 on the chroma (pixel minus its channel mean). The Wan VAE otherwise
      learns shapes and positions but keeps losing their colour (blue and green both come out dark green).
    * ``mse_weight``: an extra (weighted) squared error.
    * By default the decoder sees the posterior mode (as everything downstream does): with a 1e-6 KL the
      posterior noise of the random init (std ~1, larger than the signal) is not shrunk fast enough.
    * ``frames=1``: train on single frames (one random frame per clip; the causal Wan VAE encodes a first
      frame on its own), i.e. image pretraining: ~4x more independent samples per second than clips.
    * The decoder output is taken before Wan's clamp (:func:`decode_unclamped`).
    """
    vae = policy.vae
    vae.requires_grad_(True)
    vae.train()
    caps = world.captions("train")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(warmup, iters))
    history, l1_ema, fg_ema = [], None, None
    bar = _tqdm(iters, "VAE" if frames is None else f"VAE ({frames}-frame)")
    for it in range(iters):
        x = _random_clips(rng, caps, batch_size)
        if frames is not None:
            start = torch.from_numpy(rng.integers(0, x.shape[2] - frames + 1, size=batch_size))
            x = torch.stack([x[b, :, int(s):int(s) + frames] for b, s in enumerate(start)])
        dist = _vae_latent_dist(vae, x)
        z = dist.sample() if sample_posterior else dist.mode()
        rec = decode_unclamped(vae, z)
        err = (rec - x).abs()
        l1 = err.mean()
        fg = _foreground(x)
        w = 1.0 + fg_weight * fg
        per_pixel = l1_weight * err
        if mse_weight:
            per_pixel = per_pixel + mse_weight * err.pow(2)
        if chroma_weight:
            per_pixel = per_pixel + chroma_weight * (_chroma(rec) - _chroma(x)).abs()
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).flatten(1).sum(1).mean()
        loss = (w * per_pixel).mean() / w.mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        fg_l1 = ((err * fg).sum() / (3 * fg.sum()).clamp_min(1)).item()  # L1 on the shape's pixels only
        l1_ema = l1.item() if l1_ema is None else 0.95 * l1_ema + 0.05 * l1.item()
        fg_ema = fg_l1 if fg_ema is None else 0.95 * fg_ema + 0.05 * fg_l1
        bar.update(1)
        bar.set_postfix(l1=f"{l1_ema:.4f}", fg_l1=f"{fg_ema:.3f}")
        if (it + 1) % log_every == 0 or it + 1 == iters:
            history.append({"iter": it + 1, "l1": round(l1_ema, 5), "fg_l1": round(fg_ema, 4), "kl": round(kl.item(), 2)})
            _log(f"[{name}] iter {it + 1}/{iters} l1(ema) {l1_ema:.4f} shape-pixel l1 {fg_ema:.3f} kl {kl.item():.1f} "
                 f"lr {sched.get_last_lr()[0]:.2e}")
    bar.close()
    vae.requires_grad_(False)
    vae.eval()
    return {"iters": iters, "batch_size": batch_size, "frames": frames or "all",
            "final_l1_train_ema": round(float(l1_ema or 0.0), 5),
            "final_shape_pixel_l1_train_ema": round(float(fg_ema or 0.0), 4), "history": history}


@torch.no_grad()
def set_latent_statistics(policy, *, n_clips: int, rng: np.random.Generator, batch: int = 32) -> dict[str, Any]:
    """Measure the raw latents (posterior mode) of ``n_clips`` train clips and write the normalisation into
    the VAE config: per-channel mean/std (Wan) or ``scaling_factor = 1 / RMS`` (CogVideoX)."""
    caps = world.captions("train")
    zs = []
    for i in range(0, n_clips, batch):
        x = _random_clips(rng, caps, min(batch, n_clips - i))
        zs.append(_vae_latent_dist(policy.vae, x).mode())
    z = torch.cat(zs)  # [N, C, F, H, W]
    per_c = z.transpose(0, 1).flatten(1)
    mean, std = per_c.mean(1), per_c.std(1)
    info: dict[str, Any] = {"n_clips": n_clips, "channel_mean": [round(v, 4) for v in mean.tolist()],
                            "channel_std": [round(v, 4) for v in std.tolist()]}
    if policy.family == "wan":
        policy.vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    else:
        rms = float(z.pow(2).mean().sqrt())
        policy.vae.register_to_config(scaling_factor=1.0 / rms)
        info.update(global_mean=round(float(z.mean()), 4), global_std=round(float(z.std()), 4), rms=round(rms, 4),
                    scaling_factor=1.0 / rms)
    zn = policy.encode_video(_random_clips(rng, caps, 32))
    info["normalised_check"] = {"mean": round(float(zn.mean()), 4), "std": round(float(zn.std()), 4)}
    return info


@torch.no_grad()
def vae_heldout_l1(policy, n_seeds: int = 2, batch: int = 16) -> float:
    """Reconstruction L1 (mode latents, decoded, clamped) on held-out captions with evaluation seeds."""
    caps = world.captions("heldout")
    items = [(c, _EVAL_SEED_BASE + 1000 * k + i) for k in range(n_seeds) for i, c in enumerate(caps)]
    total, count = 0.0, 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = _render([c for c, _ in chunk], [s for _, s in chunk])
        rec = policy.decode(policy.encode_video(x))
        total += (rec - x).abs().mean().item() * len(chunk)
        count += len(chunk)
    return total / count


# ---------------------------------------------------------------------------------------------- stage B
@torch.no_grad()
def encode_pool(policy, *, seeds_per_caption: int, batch: int = 64) -> tuple[Tensor, Tensor, list[str]]:
    """Normalised latents ``[N, C, F, h, w]`` of every train caption x ``seeds_per_caption`` clips, their
    caption index ``[N]`` and the caption texts."""
    caps = world.captions("train")
    items = [(ci, _POOL_SEED_BASE + 1000 * ci + k) for ci in range(len(caps)) for k in range(seeds_per_caption)]
    lat, idx = [], []
    bar = _tqdm(len(items), "encode pool")
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = _render([caps[ci] for ci, _ in chunk], [s for _, s in chunk])
        lat.append(policy.encode_video(x))
        idx.extend(ci for ci, _ in chunk)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(lat), torch.tensor(idx), [c.text for c in caps]


def _sample_t(n: int, mode: str, gen: torch.Generator) -> Tensor:
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    if mode == "uniform":
        return torch.rand(n, generator=gen)
    raise ValueError(f"unknown t sampling '{mode}' (uniform|logit_normal)")


def train_transformer(policy, latents: Tensor, cap_idx: Tensor, texts: list[str], *, iters: int, batch_size: int,
                      lr: float, warmup: int, cond_dropout: float, t_sampling: str, ema_decay: float,
                      gen: torch.Generator, log_every: int) -> dict[str, Any]:
    """Native-objective training from scratch; the EMA weights are copied into the transformer at the end."""
    net = policy.transformer
    net.requires_grad_(True)
    net.train()
    emb_table, _ = policy.encode_prompts([*texts, ""])  # last row: the empty (unconditional) prompt
    null = len(texts)
    params = [p for p in net.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(warmup, iters, floor=0.05))
    schedule = policy.schedule
    history, loss_ema = [], None
    bar = _tqdm(iters, "transformer")
    for it in range(iters):
        b = torch.randint(0, len(latents), (batch_size,), generator=gen)
        x0 = latents[b]
        ci = cap_idx[b].clone()
        ci[torch.rand(batch_size, generator=gen) < cond_dropout] = null
        emb = emb_table[ci]
        t = _sample_t(batch_size, t_sampling, gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        loss = (policy.predict(x_t, t, emb) - schedule.target(x0, eps, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + it) / (10 + it))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - d)
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        bar.update(1)
        if it % 20 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (it + 1) % log_every == 0 or it + 1 == iters:
            history.append({"iter": it + 1, "loss": round(loss_ema, 5)})
            _log(f"[dit] iter {it + 1}/{iters} loss(ema) {loss_ema:.4f} lr {sched.get_last_lr()[0]:.2e}")
    bar.close()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    net.requires_grad_(True)
    net.eval()
    return {"iters": iters, "final_loss_train_ema": round(float(loss_ema or 0.0), 5), "history": history}


@torch.no_grad()
def heldout_denoising_loss(policy, *, n_seeds: int = 2, t_points: int = 8) -> float:
    """Native-objective MSE of the (EMA) transformer on held-out clips on a fixed t grid and fixed noise."""
    caps = world.captions("heldout")
    items = [(c, _EVAL_SEED_BASE + 500 + 1000 * k + i) for k in range(n_seeds) for i, c in enumerate(caps)]
    x0 = policy.encode_video(_render([c for c, _ in items], [s for _, s in items]))
    emb, _ = policy.encode_prompts([c.text for c, _ in items])
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for t_val in (torch.arange(t_points) + 0.5) / t_points:
        t = torch.full((len(items),), float(t_val))
        eps = torch.randn(x0.shape, generator=gen)
        pred = policy.predict(policy.schedule.add_noise(x0, eps, t), t, emb)
        total += (pred - policy.schedule.target(x0, eps, t)).pow(2).mean().item()
    return total / t_points


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sample_videos(policy, prompts: list[str], seeds: list[int], *, steps: int = 20, batch: int = 16) -> Tensor:
    """Deterministic ODE samples (:func:`trl_video.evaluation.sample_videos`) decoded to pixels ``[B, 3, F, H, W]``."""
    from trl_video.evaluation import sample_videos as sample_latents

    lat = sample_latents(policy, prompts, seeds, steps, batch_size=batch)
    return torch.cat([policy.decode(lat[i:i + batch]) for i in range(0, len(lat), batch)])


_COLOR_NAMES = list(world.COLORS)
_COLOR_TABLE = torch.tensor([world.COLORS[c] for c in _COLOR_NAMES])  # [6, 3]
_MOTION_NAMES = list(world.MOTIONS)
_MOTION_TABLE = torch.tensor([world.MOTIONS[m] for m in _MOTION_NAMES])  # [4, 2] (dx, dy), y down
_BG_NAMES = list(world.BACKGROUNDS)
_BG_TABLE = torch.tensor([world.BACKGROUNDS[b] for b in _BG_NAMES])


def analyse_video(video: Tensor, sat_threshold: float = 0.5, min_pixels: int = 4) -> dict[str, Any]:
    """Dominant non-background colour, centroid motion and background of one clip ``[3, F, H, W]``.

    Backgrounds are grey (R=G=B) and every world colour is strongly saturated, so "object" pixels are those
    with ``max(rgb) - min(rgb) > sat_threshold``; each votes for its nearest world colour. The centroid of
    the dominant colour's pixels is tracked per frame; the displacement is the least-squares slope times
    (F - 1), in pixels (x right, y down).
    """
    v = video.float()
    _, f, h, w = v.shape
    sat = v.amax(0) - v.amin(0)  # [F, H, W]
    mask = sat > sat_threshold
    pix = v.permute(1, 2, 3, 0)  # [F, H, W, 3]
    bg_pixels = pix[~mask]
    bg = _BG_NAMES[int((bg_pixels.mean(-1).median() - _BG_TABLE).abs().argmin())] if len(bg_pixels) else None
    if int(mask.sum()) < min_pixels:
        return {"color": None, "motion": None, "displacement": None, "background": bg, "area": 0.0}
    nearest = torch.cdist(pix[mask], _COLOR_TABLE).argmin(1)
    votes = torch.bincount(nearest, minlength=len(_COLOR_NAMES))
    dom = int(votes.argmax())
    sel = torch.zeros_like(mask)
    sel[mask] = nearest == dom
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    frames, cents = [], []
    for k in range(f):
        m = sel[k].float()
        if m.sum() >= 1:
            frames.append(k)
            cents.append(torch.stack([(m * xx).sum() / m.sum(), (m * yy).sum() / m.sum()]))
    motion, disp = None, None
    if len(frames) >= 2:
        fr = torch.tensor(frames, dtype=torch.float32)
        c = torch.stack(cents)
        fr_c = fr - fr.mean()
        slope = (fr_c[:, None] * (c - c.mean(0))).sum(0) / fr_c.pow(2).sum()
        d = slope * (f - 1)
        disp = [round(float(d[0]), 2), round(float(d[1]), 2)]
        if float(d.norm()) >= 3.0:  # the world moves the shape 12.8 px over the clip
            motion = _MOTION_NAMES[int((_MOTION_TABLE @ d).argmax())]
    return {"color": _COLOR_NAMES[dom], "motion": motion, "displacement": disp, "background": bg,
            "area": round(float(sel.float().mean()), 4)}


def score_videos(videos: Tensor, caps: list[world.Caption]) -> dict[str, Any]:
    res = [analyse_video(v) for v in videos]
    n = len(caps)
    along = []
    for r, c in zip(res, caps):
        if r["displacement"] is not None:
            along.append(float(torch.tensor(r["displacement"]) @ torch.tensor(world.MOTIONS[c.motion])))
    return {
        "n": n,
        "color_acc": round(sum(r["color"] == c.color for r, c in zip(res, caps)) / n, 4),
        "motion_acc": round(sum(r["motion"] == c.motion for r, c in zip(res, caps)) / n, 4),
        "background_acc": round(sum(r["background"] == c.background for r, c in zip(res, caps)) / n, 4),
        "no_object_rate": round(sum(r["color"] is None for r in res) / n, 4),
        "mean_displacement_along_caption_px": round(float(np.mean(along)), 3) if along else None,
        # VBench's dynamic degree in the world: the share of clips whose object travels at least the classifier's
        # 3 px (an object-less clip counts as static); and the mean travel in any direction
        "dynamic_degree": round(sum(r["motion"] is not None for r in res) / n, 4),
        "mean_travel_px": round(float(np.mean([np.hypot(*r["displacement"]) if r["displacement"] is not None else 0.0
                                               for r in res])), 3),
        "mean_object_area": round(float(np.mean([r["area"] for r in res])), 4),
    }


def _eval_items(split: str, n_seeds: int, max_caps: int | None = None) -> list[tuple[world.Caption, int]]:
    caps = world.captions(split)
    if max_caps is not None and len(caps) > max_caps:
        order = np.random.default_rng(7).permutation(len(caps))[:max_caps]
        caps = [caps[i] for i in sorted(order)]
    return [(c, _EVAL_SEED_BASE + 100_000 + 1000 * k + i) for k in range(n_seeds) for i, c in enumerate(caps)]


def evaluate(policy, *, steps: int, heldout_seeds: int, train_caps: int
             ) -> tuple[dict[str, Any], Tensor, list[world.Caption]]:
    out: dict[str, Any] = {}
    held_videos, held_caps = None, None
    for split, items in (("heldout", _eval_items("heldout", heldout_seeds)),
                         ("train", _eval_items("train", 1, max_caps=train_caps))):
        caps = [c for c, _ in items]
        vids = sample_videos(policy, [c.text for c in caps], [s for _, s in items], steps=steps)
        out[split] = score_videos(vids, caps)
        if split == "heldout":
            held_videos, held_caps = vids, caps
    return out, held_videos, held_caps  # type: ignore[return-value]


def save_sample_grid(path: str | Path, videos: Tensor, caps: list[world.Caption], title: str, rows: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(caps))
    pick = np.linspace(0, len(caps) - 1, rows).round().astype(int)
    f = videos.shape[2]
    cols = [("real (mid)", None), ("frame 0", 0), (f"frame {f // 2}", f // 2), (f"frame {f - 1}", f - 1)]
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.0 * len(cols) + 2.6, 2.0 * rows), squeeze=False)
    for r, i in enumerate(pick):
        c = caps[int(i)]
        for j, (name, k) in enumerate(cols):
            frame = (world.render(c, 0)[:, f // 2] if k is None else videos[int(i), :, k].numpy())
            img = ((np.transpose(frame, (1, 2, 0)) + 1) / 2).clip(0, 1)
            ax = axes[r, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_ylabel(c.text.replace(" moving", "\nmoving").replace(" on a", "\non a"), fontsize=7,
                              rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- driver
def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def pretrain(family: str, out_dir: str | Path, *, vae_iters: int | None = None, dit_iters: int | None = None,
             batch_size: int = 8, dit_batch_size: int = 32, seed: int = 0, log_every: int = 100,
             vae_image_iters: int | None = None, vae_image_batch_size: int = 32, vae_lr: float | None = None,
             kl_weight: float = 1e-6, fg_weight: float = 4.0, chroma_weight: float | None = None,
             mse_weight: float | None = None, zero_init_attention: bool | None = None, stats_clips: int = 320,
             pool_seeds_per_caption: int = 50, dit_lr: float = 1e-3, dit_warmup: int = 200,
             cond_dropout: float = 0.1, t_sampling: str = "uniform", ema_decay: float = 0.999, eval_steps: int = 20,
             eval_heldout_seeds: int = 2, eval_train_captions: int = 24, eval_random: bool = True,
             samples_png: str | Path | None = None, threads: int = 2,
             vae_from: str | Path | None = None) -> dict[str, Any]:
    """Train the tiny ``family`` model (VAE, then transformer) and save it as a diffusers pipeline folder.

    Arguments left ``None`` take the family's value from :data:`DEFAULTS`. ``batch_size`` is the VAE's clip
    batch, ``vae_image_*`` the single-frame VAE pretraining stage (Wan), ``dit_*`` the transformer's.
    ``vae_from``: a pipeline folder of the same family (e.g. an earlier run) whose trained, normalised VAE is
    reused instead of running stage A (handy to re-tune the transformer cheaply).

    Returns the report (also written to ``out_dir/pretrain_report.json``).
    """
    from trl_video.models.presets import build_random

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}' ({'|'.join(FAMILIES)})")
    d = DEFAULTS[family]
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    vae_iters, dit_iters = pick(vae_iters, "vae_iters"), pick(dit_iters, "dit_iters")
    vae_image_iters, vae_lr = pick(vae_image_iters, "vae_image_iters"), pick(vae_lr, "vae_lr")
    chroma_weight, mse_weight = pick(chroma_weight, "chroma_weight"), pick(mse_weight, "mse_weight")
    zero_init_attention = pick(zero_init_attention, "zero_init_attention")
    torch.set_num_threads(threads)
    out = Path(out_dir)
    t_start = time.time()
    config = dict(family=family, vae_image_iters=vae_image_iters, vae_image_batch_size=vae_image_batch_size,
                  vae_iters=vae_iters, batch_size=batch_size, vae_lr=vae_lr, kl_weight=kl_weight,
                  fg_weight=fg_weight, chroma_weight=chroma_weight, mse_weight=mse_weight,
                  zero_init_attention=zero_init_attention, stats_clips=stats_clips, dit_iters=dit_iters,
                  dit_batch_size=dit_batch_size, seed=seed, pool_seeds_per_caption=pool_seeds_per_caption,
                  dit_lr=dit_lr, dit_warmup=dit_warmup, cond_dropout=cond_dropout, t_sampling=t_sampling,
                  ema_decay=ema_decay, eval_steps=eval_steps, eval_heldout_seeds=eval_heldout_seeds, threads=threads)
    report: dict[str, Any] = {"config": config, "torch": torch.__version__}
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except Exception:  # pragma: no cover
        pass

    torch.manual_seed(seed)
    policy = build_random(family, seed=seed)
    rng = np.random.default_rng(seed)
    _log(f"[pretrain] {family}: latent shape {policy.latent_shape}; VAE {vae_image_iters} single-frame + "
         f"{vae_iters} clip it, transformer {dit_iters} it")

    # ---- stage A
    t0 = time.time()
    if vae_from is not None:
        from trl_video.models.policy import load_policy

        donor = load_policy(str(vae_from))
        if donor.family != family:
            raise ValueError(f"--vae-from {vae_from} is a {donor.family} model, not {family}")
        policy.vae = donor.vae
        prev = Path(vae_from) / "pretrain_report.json"
        vae_rep = dict(json.loads(prev.read_text())["vae"]) if prev.exists() else {}
        vae_rep["reused_from"] = str(vae_from)
        config["vae_iters"] = vae_rep.get("iters")
    else:
        vae_rep = {"zero_init_attention_blocks": zero_init_vae_attention(policy.vae) if zero_init_attention else 0}
        loss_kw = dict(lr=vae_lr, kl_weight=kl_weight, fg_weight=fg_weight, chroma_weight=chroma_weight,
                       mse_weight=mse_weight, rng=rng, log_every=log_every)
        if vae_image_iters > 0:
            vae_rep["image_stage"] = train_vae(policy, iters=vae_image_iters, batch_size=vae_image_batch_size,
                                               frames=1, name="vae-img", **loss_kw)
        if vae_iters > 0:
            vae_rep.update(train_vae(policy, iters=vae_iters, batch_size=batch_size, **loss_kw))
        vae_rep["latent_stats"] = set_latent_statistics(policy, n_clips=stats_clips, rng=rng)
    vae_rep["heldout_recon_l1"] = round(vae_heldout_l1(policy), 5)
    if vae_from is None:
        vae_rep["seconds"] = round(time.time() - t0, 1)
    report["vae"] = vae_rep
    _log(f"[vae] held-out reconstruction L1 {vae_rep['heldout_recon_l1']:.4f} ({vae_rep.get('seconds', 0):.0f}s); "
         f"normalised latents {vae_rep.get('latent_stats', {}).get('normalised_check')}")

    # ---- stage B
    t0 = time.time()
    latents, cap_idx, texts = encode_pool(policy, seeds_per_caption=pool_seeds_per_caption)
    t_enc = time.time() - t0
    gen = torch.Generator().manual_seed(seed + 17)
    torch.manual_seed(seed + 17)
    dit_rep = train_transformer(policy, latents, cap_idx, texts, iters=dit_iters, batch_size=dit_batch_size,
                                lr=dit_lr, warmup=dit_warmup, cond_dropout=cond_dropout, t_sampling=t_sampling,
                                ema_decay=ema_decay, gen=gen, log_every=log_every)
    dit_rep["pool_clips"] = int(len(latents))
    dit_rep["encode_seconds"] = round(t_enc, 1)
    dit_rep["heldout_denoising_loss_ema_weights"] = round(heldout_denoising_loss(policy), 5)
    dit_rep["seconds"] = round(time.time() - t0, 1)
    report["transformer"] = dit_rep
    _log(f"[dit] final loss {dit_rep['final_loss_train_ema']:.4f}; held-out denoising loss "
         f"{dit_rep['heldout_denoising_loss_ema_weights']:.4f} ({dit_rep['seconds']:.0f}s)")

    # ---- save
    out.mkdir(parents=True, exist_ok=True)
    policy.transformer.requires_grad_(False)
    policy.source = f"tiny-{family}"
    policy.save_pretrained(out)

    # ---- evaluate
    t0 = time.time()
    ev: dict[str, Any] = {"sampler": f"deterministic DDIM/Euler, {eval_steps} steps, no CFG",
                          "heldout_captions": len(world.captions("heldout"))}
    # the analyser itself, on real renders (should be ~1.0)
    items = _eval_items("heldout", eval_heldout_seeds)
    real = _render([c for c, _ in items], [s for _, s in items])
    ev["real_clips_heldout"] = score_videos(real, [c for c, _ in items])
    ev["vae_reconstructions_heldout"] = score_videos(policy.decode(policy.encode_video(real)), [c for c, _ in items])
    ev["trained"], videos, caps = evaluate(policy, steps=eval_steps, heldout_seeds=eval_heldout_seeds,
                                           train_caps=eval_train_captions)
    if eval_random:
        ev["random_weights"], _, _ = evaluate(build_random(family, seed=seed), steps=eval_steps,
                                              heldout_seeds=eval_heldout_seeds, train_caps=eval_train_captions)
    # reload check: the saved folder gives the same predictions
    from trl_video.models.policy import load_policy

    reloaded = load_policy(str(out))
    with torch.no_grad():
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
        texts2 = [c.text for c in caps[:2]]
        t = torch.tensor([0.3, 0.8])
        diff = reloaded.predict(x, t, reloaded.encode_prompts(texts2)[0]) - policy.predict(x, t, policy.encode_prompts(texts2)[0])
        ev["reload_max_abs_diff"] = float(diff.abs().max())
    ev["seconds"] = round(time.time() - t0, 1)
    report["eval"] = ev
    if samples_png is not None:
        save_sample_grid(samples_png, videos, caps, f"tiny-{family}: held-out captions (sampled, {eval_steps} steps)")
        report["samples_png"] = str(samples_png)
    report["seconds_total"] = round(time.time() - t_start, 1)
    report["folder_mb"] = round(_folder_mb(out), 3)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    report["folder_mb"] = round(_folder_mb(out), 3)
    _log(f"[eval] held-out colour acc trained {ev['trained']['heldout']['color_acc']:.2f}"
         + (f" vs random {ev['random_weights']['heldout']['color_acc']:.2f}" if eval_random else "")
         + f"; motion acc trained {ev['trained']['heldout']['motion_acc']:.2f}"
         + (f" vs random {ev['random_weights']['heldout']['motion_acc']:.2f}" if eval_random else ""))
    _log(f"[pretrain] saved {out} ({report['folder_mb']:.2f} MB) in {report['seconds_total']:.0f}s")
    return report


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--family", choices=FAMILIES, required=True, help="model family to pretrain")
    parser.add_argument("--out", default=None,
                        help="output pipeline folder (default: trl_video/assets/tiny-<family>)")
    parser.add_argument("--vae-image-iters", type=int, default=None,
                        help="single-frame VAE pretraining iterations (default: wan 1500, cogvideox 0)")
    parser.add_argument("--vae-iters", type=int, default=None,
                        help="VAE iterations on clips (default: wan 400, cogvideox 600)")
    parser.add_argument("--dit-iters", type=int, default=None,
                        help="transformer iterations (default: wan 10000, cogvideox 5000)")
    parser.add_argument("--batch-size", type=int, default=8, help="VAE batch size (clips)")
    parser.add_argument("--dit-batch-size", type=int, default=32, help="transformer batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--vae-lr", type=float, default=None, help="default: wan 5e-4, cogvideox 1e-3")
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--pool-seeds-per-caption", type=int, default=50,
                        help="clips per train caption in the encoded transformer pool")
    parser.add_argument("--t-sampling", choices=("uniform", "logit_normal"), default="uniform")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--no-eval-random", action="store_true", help="skip the random-weights comparison")
    parser.add_argument("--samples-png", default=None,
                        help="PNG of samples (default /tmp/pretrain_<family>_samples.png; 'none' to skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vae-from", default=None,
                        help="reuse the trained VAE of this pipeline folder (skips stage A)")
    return parser


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out or str(Path(trl_video.__file__).resolve().parent / "assets" / f"tiny-{args.family}")
    png = args.samples_png or f"/tmp/pretrain_{args.family}_samples.png"
    report = pretrain(args.family, out, vae_iters=args.vae_iters, dit_iters=args.dit_iters,
                      vae_image_iters=args.vae_image_iters,
                      batch_size=args.batch_size, dit_batch_size=args.dit_batch_size, seed=args.seed,
                      log_every=args.log_every, vae_lr=args.vae_lr, dit_lr=args.dit_lr,
                      pool_seeds_per_caption=args.pool_seeds_per_caption, t_sampling=args.t_sampling,
                      eval_steps=args.eval_steps, eval_random=not args.no_eval_random,
                      samples_png=None if png.lower() == "none" else png, threads=args.threads,
                      vae_from=args.vae_from)
    brief = {k: report[k] for k in ("seconds_total", "folder_mb")}
    brief["vae_heldout_recon_l1"] = report["vae"]["heldout_recon_l1"]
    brief["transformer_final_loss"] = report["transformer"]["final_loss_train_ema"]
    brief["heldout_trained"] = report["eval"]["trained"]["heldout"]
    if "random_weights" in report["eval"]:
        brief["heldout_random"] = report["eval"]["random_weights"]["heldout"]
    print(json.dumps(brief, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = add_pretrain_arguments(argparse.ArgumentParser(prog="trl-video pretrain", description=__doc__.split("\n")[0]))
    run_pretrain(parser.parse_args(argv))
    return 0
