"""The embedded synthetic video world: coloured shapes moving over backgrounds.

Deterministic by seed. A caption reads ``"a red circle moving left on a dark background"``. The prompt
space (6 colours x 2 shapes x 4 motions x 3 backgrounds = 144 captions) is split into train and held-out
captions; every attribute value appears in train, so held-out captions are new *combinations*.
Videos are ``[C=3, F, H, W]`` float32 in [-1, 1] (diffusers layout), rendered with soft edges.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.8, -0.8),
    "blue": (-0.8, -0.6, 0.9),
    "yellow": (0.9, 0.85, -0.8),
    "cyan": (-0.8, 0.85, 0.9),
    "magenta": (0.9, -0.8, 0.9),
}
SHAPES = ("circle", "square")
MOTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                           "down": (0.0, 1.0)}
BACKGROUNDS: dict[str, float] = {"dark": -0.8, "gray": -0.1, "light": 0.6}
WORDS = ["a", "moving", "on", "background", *COLORS, *SHAPES, *MOTIONS, *BACKGROUNDS]

NUM_FRAMES, SIZE = 9, 32
RADIUS_RANGE = (4.5, 6.5)  # pixels at 32 px
SPEED = 1.6  # pixels per frame


@dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    motion: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} moving {self.motion} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> Caption | None:
        """Inverse of :attr:`text`; tolerant of extra words. ``None`` if an attribute is missing."""
        words = text.lower().replace(",", " ").split()
        pick = lambda options: next((w for w in words if w in options), None)  # noqa: E731
        attrs = (pick(COLORS), pick(SHAPES), pick(MOTIONS), pick(BACKGROUNDS))
        return cls(*attrs) if all(attrs) else None  # type: ignore[arg-type]


def all_captions() -> list[Caption]:
    return [Caption(*c) for c in itertools.product(COLORS, SHAPES, MOTIONS, BACKGROUNDS)]


def _is_heldout(c: Caption) -> bool:
    h = int(hashlib.sha256(c.text.encode()).hexdigest(), 16)
    return h % 6 == 0


def captions(split: str) -> list[Caption]:
    """``train`` or ``heldout`` (about 1/6 of the combinations, fixed by hash)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown world split '{split}' (train|heldout)")
    return [c for c in all_captions() if _is_heldout(c) == (split == "heldout")]


def render(caption: Caption, seed: int, num_frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """One clip ``[3, F, size, size]`` in [-1, 1]; size/position drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    scale = size / SIZE
    r = rng.uniform(*RADIUS_RANGE) * scale
    dx, dy = MOTIONS[caption.motion]
    travel = SPEED * scale * (num_frames - 1)
    margin = r + 1
    # start so that the whole path stays inside the frame
    lo_x = margin - min(0, dx * travel)
    hi_x = size - margin - max(0, dx * travel)
    lo_y = margin - min(0, dy * travel)
    hi_y = size - margin - max(0, dy * travel)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = BACKGROUNDS[caption.background]
    col = np.array(COLORS[caption.color], dtype=np.float32)[:, None, None]
    out = np.empty((3, num_frames, size, size), dtype=np.float32)
    for f in range(num_frames):
        cx, cy = x0 + dx * SPEED * scale * f, y0 + dy * SPEED * scale * f
        if caption.shape == "circle":
            dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - r
        else:
            half = r * 0.9
            dist = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - half
        alpha = np.clip(0.5 - dist, 0.0, 1.0)  # one-pixel soft edge
        out[:, f] = bg * (1 - alpha) + col * alpha
    return out


def world_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` (caption, seed) records of a split, cycling through its captions in a seeded order."""
    caps = captions(split)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(caps))
    recs = []
    for i in range(n):
        c = caps[order[i % len(caps)]]
        recs.append({"prompt": c.text, "color": c.color, "shape": c.shape, "motion": c.motion,
                     "background": c.background, "seed": int(seed * 1_000_003 + i)})
    return recs


def _gen(split: str, n: int, seed: int, with_video: bool):
    for rec in world_examples(split, n, seed):
        if with_video:
            rec = dict(rec, video=render(Caption.parse(rec["prompt"]), rec["seed"]))  # type: ignore[arg-type]
        yield rec


def world_dataset(split: str = "train", n: int | None = None, seed: int = 0, with_video: bool = False):
    """The world as an HF ``datasets.Dataset`` built by ``Dataset.from_generator`` (deterministic by seed).

    Without videos it is a prompt dataset (column ``prompt`` + attributes); with ``with_video=True`` each
    row also holds the rendered clip ``[3, F, H, W]``.
    """
    import datasets

    n = n if n is not None else len(captions(split))
    features = {
        "prompt": datasets.Value("string"), "color": datasets.Value("string"), "shape": datasets.Value("string"),
        "motion": datasets.Value("string"), "background": datasets.Value("string"), "seed": datasets.Value("int64"),
    }
    if with_video:
        features["video"] = datasets.Array4D(shape=(3, NUM_FRAMES, SIZE, SIZE), dtype="float32")
    return datasets.Dataset.from_generator(
        _gen, gen_kwargs={"split": split, "n": n, "seed": seed, "with_video": with_video},
        features=datasets.Features(features), keep_in_memory=True,
    )


def render_batch(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Ground-truth clips ``[B, 3, F, H, W]`` for captions (used by tests and the dataset builders)."""
    clips = []
    for p, s in zip(prompts, seeds):
        c = Caption.parse(p)
        if c is None:
            raise ValueError(f"not a world caption: '{p}'")
        clips.append(torch.from_numpy(render(c, s)))
    return torch.stack(clips)


def motion_vector(motion: str) -> tuple[float, float]:
    return MOTIONS[motion]


EXPECTED_AREA = math.pi * ((RADIUS_RANGE[0] + RADIUS_RANGE[1]) / 2) ** 2 / SIZE**2
