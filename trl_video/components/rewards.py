"""Built-in rewards (hook point ``reward``).

Input contract: pixel rewards take videos ``[B, 3, F, H, W]`` in [-1, 1] (the policy's ``decode`` output);
latent rewards take normalised latents ``[B, C, F, H, W]``. Every reward returns ``[B]`` float and
declares ``space`` and ``differentiable``; the trainer decodes only for pixel rewards and keeps the
graph only when the loss needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import world

LUMA = (0.299, 0.587, 0.114)


class Reward:
    name = "reward"
    space = "pixel"
    differentiable = True

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError


def luma(video: Tensor) -> Tensor:
    """Per-pixel luma in [0, 1] of a [-1, 1] RGB video ``[B, 3, F, H, W]`` -> ``[B, F, H, W]``."""
    rgb = (video.float() + 1) / 2
    w = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1, 1)
    return (rgb * w).sum(1)


class LuminanceReward(Reward):
    """Mean frame luma (ITU-R BT.601 weights) in [0, 1]: the FCRM paper's lightness reward."""

    name = "luminance"

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        return luma(inputs).flatten(1).mean(1)


class MotionReward(Reward):
    """Mean absolute difference between consecutive frames (in [0, 2] pixel units): a dynamic-degree proxy."""

    name = "motion"

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        if inputs.shape[2] < 2:
            return torch.zeros(inputs.shape[0], device=inputs.device)
        return (inputs[:, :, 1:] - inputs[:, :, :-1]).abs().flatten(1).mean(1)


class AlignmentReward(Reward):
    """Prompt alignment for the embedded world, differentiable, in about [-1, 1].

    From the caption ("a red circle moving left on a dark background") it builds a soft mask of pixels
    close to the named colour, ``m = exp(-|p - c|^2 / (2 tau^2))``, and scores four things:

    * colour: the named colour covers about the expected object area in every frame
      (``tanh(mass / expected_area)``, and the wrong colours of the palette are penalised);
    * background: pixels outside the object are close to the named background grey;
    * motion: the mask centroid moves in the named direction (``tanh(displacement / 6 px)``, signed);
    * shape: the mask's normalised moment ``E[x^2 y^2] / (E[x^2] + E[y^2])^2`` is 1/6 for a disk and 1/4
      for an axis-aligned square; scored by a logistic around the midpoint (signed).

    Weights (colour, background, motion, shape) = (0.35, 0.15, 0.3, 0.2). Prompts that are not world
    captions score 0.
    """

    name = "alignment"

    def __init__(self, tau: float = 0.35, weights: tuple[float, float, float, float] = (0.35, 0.15, 0.3, 0.2)):
        self.tau = tau
        self.weights = weights

    def components(self, video: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Each component ``[B]`` (0 where the prompt is not a world caption), computed for the whole batch at once:
        every sample goes through the same operations as alone (no per-sample Python loop), so a sample's value
        does not depend on the batch it is in."""
        v = video.float()
        b, _, f, h, w = v.shape
        dev = v.device
        out = {k: torch.zeros(b, device=dev) for k in ("color", "background", "motion", "shape")}
        parsed = [(i, c) for i, p in enumerate(prompts) if (c := world.Caption.parse(p)) is not None]
        if not parsed:
            return out
        rows, caps = [i for i, _ in parsed], [c for _, c in parsed]
        names = list(world.COLORS)
        chosen = [names.index(c.color) for c in caps]
        idx = torch.tensor(rows, device=dev)
        n, k = len(rows), len(names)
        scale = h / world.SIZE
        yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=v.dtype) + 0.5,
                                torch.arange(w, device=dev, dtype=v.dtype) + 0.5, indexing="ij")
        palette = torch.tensor(list(world.COLORS.values()), device=dev, dtype=v.dtype)  # [K, 3]
        x = v[idx]  # [N, 3, F, H, W]
        d2 = ((x.unsqueeze(1) - palette.view(1, -1, 3, 1, 1, 1)) ** 2).sum(2)  # [N, K, F, H, W]
        masks = torch.exp(-d2 / (2 * self.tau**2))
        m = masks[torch.arange(n, device=dev), torch.tensor(chosen, device=dev)]  # [N, F, H, W] the named colour
        area = m.flatten(2).mean(2)  # [N, F] per frame
        # the other colours of the palette, in palette order
        others = torch.tensor([[j for j in range(k) if j != c] for c in chosen], device=dev)  # [N, K-1]
        per_colour = masks.flatten(3).mean(3)  # [N, K, F]
        wrong = per_colour.gather(1, others.unsqueeze(-1).expand(-1, -1, f)).sum(1)  # [N, F]
        presence = torch.tanh(area / world.EXPECTED_AREA) - torch.tanh(wrong / world.EXPECTED_AREA)
        out["color"] = out["color"].index_put((idx,), presence.mean(1))
        bgv = torch.tensor([world.BACKGROUNDS[c.background] for c in caps], device=dev,
                           dtype=v.dtype).view(-1, 1, 1, 1, 1)
        bg_close = torch.exp(-((x - bgv) ** 2).sum(1) / (2 * self.tau**2))  # [N, F, H, W]
        background = ((1 - m) * bg_close).flatten(1).sum(1) / (1 - m).flatten(1).sum(1).clamp_min(1e-6)
        out["background"] = out["background"].index_put((idx,), background)
        # geometry from a floored mask: faint colour leakage over the whole background would otherwise
        # dominate the centroid and the 4th moments
        m = torch.relu(m - 0.02)
        mass = m.flatten(2).sum(2).clamp_min(1e-6)  # [N, F]
        cx = (m * xx).flatten(2).sum(2) / mass
        cy = (m * yy).flatten(2).sum(2) / mass
        dx, dy = (torch.tensor([world.MOTIONS[c.motion][j] for c in caps], device=dev, dtype=v.dtype) for j in (0, 1))
        disp = ((cx[:, -1] - cx[:, 0]) * dx + (cy[:, -1] - cy[:, 0]) * dy) / scale
        out["motion"] = out["motion"].index_put((idx,), torch.tanh(disp / 6.0))
        rx, ry = xx - cx.view(n, -1, 1, 1), yy - cy.view(n, -1, 1, 1)
        ex2, ey2 = (m * rx**2).flatten(2).sum(2) / mass, (m * ry**2).flatten(2).sum(2) / mass
        exy = (m * rx**2 * ry**2).flatten(2).sum(2) / mass
        ratio = exy / (ex2 + ey2).clamp_min(1e-6) ** 2
        squareness = torch.tanh((ratio - (1 / 6 + 1 / 4) / 2) / 0.02).mean(1)
        square = torch.tensor([c.shape == "square" for c in caps], device=dev)
        out["shape"] = out["shape"].index_put((idx,), torch.where(square, squareness, -squareness))
        return out

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        comps = self.components(inputs, prompts)
        wc, wb, wm, ws = self.weights
        return wc * comps["color"] + wb * comps["background"] + wm * comps["motion"] + ws * comps["shape"]


class SharpnessReward(Reward):
    """Single-frame sharpness (texture / detail) in [0, 1): each frame is scored alone, no temporal term.

    Per frame, the gradient energy of the luma ``L`` (BT.601, in [0, 1]) with forward differences,
    ``E = mean_{y,x} (L[y, x+1] - L[y, x])^2 + mean_{y,x} (L[y+1, x] - L[y, x])^2`` (a Tenengrad-style focus
    measure), saturated as ``tanh(E / scale)``; the video's score is the mean over its frames. Blur lowers it (a
    step of height ``h`` spread over ``n`` pixels has energy ``h^2 / n``) and contrast raises it: the
    preference of an image-quality reward such as ImageReward for crisp, detailed frames, with no notion of
    motion. ``scale`` 0.003 is about the mean ``E`` of the world's ground-truth frames (0.0032 on 16 held-out
    clips; a frame of 32 x 32 px). The saturation bounds what noise or contrast alone can earn.
    """

    name = "sharpness"

    def __init__(self, scale: float = 0.003):
        self.scale = scale

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        lum = luma(inputs)  # [B, F, H, W]
        energy = (lum[..., :, 1:] - lum[..., :, :-1]).pow(2).mean((-2, -1)) \
            + (lum[..., 1:, :] - lum[..., :-1, :]).pow(2).mean((-2, -1))  # [B, F]
        return torch.tanh(energy / self.scale).mean(1)


class CallableReward(Reward):
    """Wraps any callable ``fn(inputs, prompts) -> Tensor[B]`` named by dotted path in a recipe.
    ``space``/``differentiable`` come from the callable's attributes or the recipe's reward_args."""

    def __init__(self, fn: Callable[..., Tensor], name: str = "callable", space: str | None = None,
                 differentiable: bool | None = None):
        self.fn = fn
        self.name = name
        self.space = str(space or getattr(fn, "space", "pixel"))
        self.differentiable = differentiable if differentiable is not None else getattr(fn, "differentiable", False)

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        out = self.fn(inputs, prompts)
        # anything but a tensor is passed on as is: TrainContext.score names the wrong return type
        return out.to(inputs.device) if isinstance(out, Tensor) else out


class WeightedSum(Reward):
    """``reward: {alignment: 1.0, luminance: 0.5}`` in a recipe: a weighted sum of registered rewards."""

    def __init__(self, parts: dict[str, tuple[Reward, float]]):
        self.parts = parts
        self.name = "+".join(parts)
        spaces = {r.space for r, _ in parts.values()}
        self.space = "pixel" if "pixel" in spaces else "latent"
        self.differentiable = all(r.differentiable for r, _ in parts.values())
        if len(spaces) > 1:
            from ..errors import TrlVideoError

            raise TrlVideoError(f"reward mix {list(parts)} combines pixel and latent rewards; use one space")

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        return sum(w * r(inputs, prompts) for r, w in self.parts.values())  # type: ignore[return-value]


BUILTIN_REWARDS = {c.name: c for c in (LuminanceReward, MotionReward, AlignmentReward, SharpnessReward)}
