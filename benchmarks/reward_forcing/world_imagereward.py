"""A world ImageReward: ImageReward's architecture at a tiny size, trained on the world's preference pairs.

Reward-Forcing's ablation (Sec. 5.2) explains the motion lost by random-frame supervision with the nature of
ImageReward: a single-image model of human preference that knows nothing of motion. ImageReward's weights cannot be
fetched here, so this script trains one for the embedded world:

* architecture: ImageReward's (Xu et al. 2023): BLIP ViT over the image, BLIP's image-grounded BERT over the prompt
  cross-attending to it, the [CLS] state through the 5-layer MLP; transformers' BLIP modules from small configs,
  scored by ``vidrl_plugin_rewards.blip.ImageReward.score_images`` (the reward users load), saved in the
  THUDM/ImageReward layout so ``reward: imagereward`` with ``model: <folder>`` loads it through the real code;
* loss: ImageReward's pairwise ranking loss ``-log sigmoid(r(x_w) - r(x_l))`` over preferred / rejected images of the
  same prompt (the paper's Eq. 2 with one pair per prompt);
* preferences, labelled by the world's rules in place of annotators (ImageReward's annotators rank text alignment,
  fidelity and aesthetics): a ground-truth frame of the caption is preferred over the same frame with one attribute
  of the caption changed (colour, shape or background), over it blurred, faded toward the background or noised.
  With ``--composition`` the raters also prefer, of two ground-truth frames of the caption, the one whose subject is
  nearer the centre of the image (a common composition preference of human raters); this gives the reward a preferred
  place for the object, which none of the world's other rewards has.

    python benchmarks/reward_forcing/world_imagereward.py --out out/tiny/world_imagereward
    python benchmarks/reward_forcing/world_imagereward.py --out out/tiny/world_imagereward_composition --composition

Held-out pair accuracy per kind (captions never seen in training) goes to ``results/<name>.json``. The reward-stage
ablation then uses it with ``--reward imagereward --reward-args '{"model": "<out>", "tokenizer": "<out>/bert",
"vision": <the vision config printed and stored in <out>/world_imagereward.json>}'``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trl_video import world
from trl_video.errors import TrlVideoError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"

VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": world.SIZE, "patch_size": 4}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
        "encoder_width": VISION["hidden_size"], "add_cross_attention": True}
KINDS = ("attribute", "blur", "fade", "noise")


def save_tokenizer(folder: Path) -> int:
    """bert-base-uncased's layout (``vocab.txt``) with the world's words; returns the vocabulary size after BLIP's
    two added tokens ([DEC], [ENC])."""
    words = sorted({w for c in world.all_captions() for w in c.text.split()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return 5 + len(words) + 2


def _swap_attribute(c: world.Caption, rng: np.random.Generator) -> world.Caption:
    field = ("color", "shape", "background")[rng.integers(3)]
    options = {"color": list(world.COLORS), "shape": list(world.SHAPES), "background": list(world.BACKGROUNDS)}[field]
    other = [o for o in options if o != getattr(c, field)]
    return world.Caption(**{**c.__dict__, field: other[rng.integers(len(other))]})


def _blur(img: Tensor, sigma: float) -> Tensor:
    r = int(np.ceil(2.5 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    pad = F.pad(img[None], (r, r, r, r), mode="replicate")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


def object_offset(img: Tensor) -> float:
    """Distance in pixels from the image centre to the centroid of the saturated (object) pixels; the world's
    backgrounds are grey and every object colour saturated."""
    sat = (img.amax(0) - img.amin(0)) > 0.5
    if int(sat.sum()) == 0:
        return float("inf")
    ys, xs = torch.nonzero(sat, as_tuple=True)
    c = (img.shape[-1]) / 2
    return float(torch.hypot(xs.float().mean() + 0.5 - c, ys.float().mean() + 0.5 - c))


def make_pairs(split: str, n: int, rng: np.random.Generator, kinds: tuple[str, ...]
               ) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """``n`` preference pairs ``(preferred [n, 3, H, W], rejected [n, 3, H, W], prompts, kinds)`` of a world split."""
    caps = world.captions(split)
    wins, loses, prompts, kind_of = [], [], [], []
    while len(wins) < n:
        c = caps[rng.integers(len(caps))]
        seed, frame = int(rng.integers(1 << 30)), int(rng.integers(world.NUM_FRAMES))
        win = torch.from_numpy(world.render(c, seed)[:, frame])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "attribute":
            lose = torch.from_numpy(world.render(_swap_attribute(c, rng), seed)[:, frame])  # same place and size
        elif kind == "blur":
            lose = _blur(win, float(rng.uniform(0.7, 2.0)))
        elif kind == "fade":
            bg = world.BACKGROUNDS[c.background]
            lose = win + float(rng.uniform(0.35, 0.75)) * (bg - win)
        elif kind == "noise":
            lose = (win + float(rng.uniform(0.1, 0.3)) * torch.randn(win.shape,
                    generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))).clamp(-1, 1)
        else:  # composition: two true frames of the caption, the subject nearer the centre preferred
            other = torch.from_numpy(world.render(c, int(rng.integers(1 << 30)))[:, int(rng.integers(world.NUM_FRAMES))])
            d_win, d_other = object_offset(win), object_offset(other)
            if abs(d_win - d_other) < 3.0:  # too close to call: the raters abstain
                continue
            win, lose = (win, other) if d_win < d_other else (other, win)
        wins.append(win)
        loses.append(lose)
        prompts.append(c.text)
        kind_of.append(kind)
    return torch.stack(wins), torch.stack(loses), prompts, kind_of


def build_reward(out: Path, seed: int) -> Any:
    """A randomly initialised ImageReward in the THUDM layout at ``out``, loaded through the real loader."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    from vidrl_plugin_rewards.blip import ImageReward, save_imagereward
    from vidrl_plugin_rewards.clip import AestheticHead

    vocab = save_tokenizer(out / "bert")
    med = {**TEXT, "vocab_size": vocab}
    torch.manual_seed(seed)
    vis = BlipVisionModel(BlipVisionConfig(**VISION, layer_norm_eps=1e-6))
    txt = BlipTextModel(BlipTextConfig(**{k: v for k, v in med.items() if k not in ("encoder_width", "add_cross_attention")},
                                       encoder_hidden_size=VISION["hidden_size"]), add_pooling_layer=False)
    save_imagereward(out, vis, txt, AestheticHead(TEXT["hidden_size"]), med)
    return ImageReward(model=str(out), tokenizer=str(out / "bert"), vision=VISION), med


@torch.no_grad()
def pair_accuracy(reward: Any, pairs: tuple[Tensor, Tensor, list[str], list[str]]) -> dict[str, float]:
    win, lose, prompts, kinds = pairs
    margin = reward.score_images(win, prompts) - reward.score_images(lose, prompts)
    acc = {k: round(float((margin[[i for i, x in enumerate(kinds) if x == k]] > 0).float().mean()), 4)
           for k in sorted(set(kinds))}
    acc["all"] = round(float((margin > 0).float().mean()), 4)
    return acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for ImageReward.pt, med_config.json, bert/")
    ap.add_argument("--composition", action="store_true", help="raters also prefer a centred subject")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64, help="pairs per step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-pairs", type=int, default=1000)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch < 1:
        raise TrlVideoError("--steps and --batch must be >= 1")
    torch.set_num_threads(1)
    out = (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    if out.exists() and not out.is_dir():
        raise TrlVideoError(f"--out {a.out} is a file; give a folder")
    kinds = (*KINDS, "composition") if a.composition else KINDS
    reward, med = build_reward(out, a.seed)
    modules = (reward.vision, reward.text, reward.head)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    warm = max(1, a.steps // 20)  # linear warm-up over 5% of the steps, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, (a.steps - i) / (a.steps - warm + 1)))
    rng = np.random.default_rng(a.seed)
    held = make_pairs("heldout", a.heldout_pairs, np.random.default_rng(10_000 + a.seed), kinds)
    curve, t0 = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        win, lose, prompts, _ = make_pairs("train", a.batch, rng, kinds)
        r = reward.score_images(torch.cat([win, lose]), prompts + prompts)
        loss = -F.logsigmoid(r[: a.batch] - r[a.batch:]).mean()  # ImageReward's ranking loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps:
            for m in modules:
                m.eval()
            acc = pair_accuracy(reward, held)
            for m in modules:
                m.train()
            curve.append({"step": step, "loss": round(loss.item(), 4), "heldout_acc": acc})
            print(f"step {step} loss {loss.item():.4f} held-out pair accuracy {acc} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for m in modules:
        m.requires_grad_(False).eval()
    from vidrl_plugin_rewards.blip import save_imagereward

    save_imagereward(out, *modules, med)
    in_repo = out.is_relative_to(REPO)  # an experiment in the repository, not a test's temporary folder
    shown = out.relative_to(REPO) if in_repo else out
    info = {"command": "python benchmarks/reward_forcing/world_imagereward.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                       else argv),
            "kinds": list(kinds), "steps": a.steps, "batch_pairs": a.batch, "lr": a.lr, "seed": a.seed,
            "vision": VISION, "med_config": med, "train_seconds": round(time.perf_counter() - t0, 1),
            "heldout_pairs": a.heldout_pairs, "heldout_acc": curve[-1]["heldout_acc"], "curve": curve,
            "reward_args": {"model": str(shown), "tokenizer": str(shown / "bert"), "vision": VISION}}
    (out / "world_imagereward.json").write_text(json.dumps(info, indent=2))
    if in_repo:  # keep the experiment's record next to the other results
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{out.name}.json").write_text(json.dumps(info, indent=2))
    print("reward_args:", json.dumps(info["reward_args"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrlVideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
