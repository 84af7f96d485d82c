"""The ensemble latent reward model (LRM) of VELR (paper Sec. 4.1-4.2) and its ``lrm`` reward component.

One member ``R_i(Z^v, Z^c)``:

* 3 residual 3-D conv blocks (paper Eq. 4):
  ``H_l = SiLU( GN(W2 * SiLU(GN(W1 * H_{l-1}))) + D(H_{l-1}) )`` where ``D`` is a strided 1x1x1 conv
  (the downsampling residual path) and ``W1`` carries the same stride;
* flatten to ``T' H' W'`` tokens, add learnable temporal + spatial position embeddings;
* cross-attention from the video tokens (queries) to the projected LAST real token of the prompt
  embedding (key/value, CLIP-style pooling of the text);
* a pre-norm transformer encoder (self-attention + FFN);
* mean-pool the tokens and an MLP head to a scalar.

The ensemble holds N independently initialised members; ``Agg`` is mean | min | max (paper Eq. 7) and the
members' (population) variance is the uncertainty used by the replay buffer.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AGGREGATIONS = ("mean", "min", "max")


# ------------------------------------------------------------------------------------------ math helpers
def huber_loss(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """Paper Eq. 6: ``0.5 d^2`` if ``|d| <= delta`` else ``delta (|d| - delta / 2)``, ``d = target - pred``;
    mean over the batch."""
    d = (target - pred).abs()
    return torch.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    xc, yc = x - x.mean(), y - y.mean()
    den = (xc.norm() * yc.norm()).item()
    return float((xc * yc).sum().item() / den) if den > 0 else 0.0


def aggregate(preds: Tensor, how: str = "mean") -> Tensor:
    """``preds [N, B]`` (members x samples) -> ``[B]``."""
    if how == "mean":
        return preds.mean(0)
    if how == "min":
        return preds.min(0).values
    if how == "max":
        return preds.max(0).values
    raise ValueError(f"unknown LRM aggregation '{how}' (expected one of {AGGREGATIONS})")


def member_variance(preds: Tensor) -> Tensor:
    """Population variance of the members' predictions: ``mean_i (R_i - mean_j R_j)^2``, ``[B]``."""
    return preds.var(0, unbiased=False) if preds.shape[0] > 1 else torch.zeros_like(preds[0])


def last_token(embeds: Tensor, mask: Tensor | None) -> Tensor:
    """The last REAL token of each prompt embedding ``[B, L, D] -> [B, D]`` (padding is masked out)."""
    if mask is None:
        return embeds[:, -1]
    idx = (mask.long().sum(1) - 1).clamp_min(0).to(embeds.device)
    return embeds[torch.arange(embeds.shape[0], device=embeds.device), idx]


@contextlib.contextmanager
def frozen_params(module: nn.Module) -> Iterator[None]:
    """Run a forward whose graph reaches the inputs but not the module's parameters (the policy's reward
    gradient must not leak into the LRM's .grad)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ------------------------------------------------------------------------------------------ network
def _groups(c: int, want: int = 8) -> int:
    g = min(want, c)
    while c % g:
        g -= 1
    return g


class ResBlock3D(nn.Module):
    """Paper Eq. 4 with a strided residual path ``D``."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.down = nn.Conv3d(cin, cout, 1, stride=stride)

    def forward(self, h: Tensor) -> Tensor:
        y = F.silu(self.norm1(self.conv1(h)))
        return F.silu(self.norm2(self.conv2(y)) + self.down(h))


def auto_strides(frames: int, height: int, width: int, blocks: int = 3, min_side: int = 2) -> list[tuple[int, int, int]]:
    """Halve H and W in a block while the result stays >= ``min_side``; time is never downsampled (the
    temporal position embedding keeps one slot per latent frame)."""
    out = []
    h, w = height, width
    for _ in range(blocks):
        s = 2 if min(h, w) >= 2 * min_side else 1
        out.append((1, s, s))
        h, w = math.ceil(h / s), math.ceil(w / s)
    return out


class LRMMember(nn.Module):
    """One latent reward model ``R_i(z, c) -> scalar``."""

    def __init__(self, latent_channels: int, text_dim: int, latent_grid: tuple[int, int, int],
                 widths: tuple[int, ...] = (32, 64, 128), heads: int = 4, layers: int = 2, ffn_mult: int = 4,
                 strides: list[tuple[int, int, int]] | None = None):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"the LRM has 3 residual blocks: widths must have 3 entries, got {widths}")
        f, h, w = latent_grid
        strides = strides or auto_strides(f, h, w)
        blocks, cin = [], latent_channels
        for cout, s in zip(widths, strides):
            blocks.append(ResBlock3D(cin, cout, tuple(s)))  # type: ignore[arg-type]
            cin = cout
            f, h, w = math.ceil(f / s[0]), math.ceil(h / s[1]), math.ceil(w / s[2])
        self.blocks = nn.Sequential(*blocks)
        d = widths[-1]
        self.token_grid = (f, h, w)
        self.pos_t = nn.Parameter(torch.randn(f, d) * 0.02)  # temporal position embedding
        self.pos_s = nn.Parameter(torch.randn(h * w, d) * 0.02)  # spatial position embedding
        self.text_proj = nn.Linear(text_dim, d)  # W_p: last prompt token -> video feature dim
        self.norm_q = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, heads, batch_first=True)
        layer = nn.TransformerEncoderLayer(d, heads, ffn_mult * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))

    def _pos(self, f: int, h: int, w: int) -> Tensor:
        pt, ps = self.pos_t, self.pos_s
        f0, h0, w0 = self.token_grid
        if f != f0:  # other clip lengths / sizes: interpolate the learned tables
            pt = F.interpolate(pt.T[None], size=f, mode="linear", align_corners=False)[0].T
        if (h, w) != (h0, w0):
            grid = ps.T.reshape(1, -1, h0, w0)
            ps = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).reshape(-1, h * w).T
        return (pt[:, None, :] + ps[None, :, :]).reshape(f * h * w, -1)

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        """``z [B, C, F, H, W]`` normalised latents, ``text [B, D_text]`` last prompt token -> ``[B]``."""
        x = self.blocks(z)
        b, d, f, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2) + self._pos(f, h, w)  # [B, F*H*W, d]
        kv = self.text_proj(text.to(tok.dtype)).unsqueeze(1)  # [B, 1, d]
        q = self.norm_q(tok)
        tok = tok + self.cross(q, kv, kv, need_weights=False)[0]
        tok = self.encoder(tok)
        return self.head(self.norm_out(tok).mean(1)).squeeze(-1)


class LRMEnsemble(nn.Module):
    """N independently initialised members (member i is initialised from seed ``seed + i``)."""

    def __init__(self, members: int = 10, seed: int = 0, **member_kw: Any):
        super().__init__()
        if members < 1:
            raise ValueError(f"an LRM ensemble needs >= 1 member, got {members}")
        self.member_kw = dict(member_kw)
        ms = []
        for i in range(members):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1009 * i)
                ms.append(LRMMember(**member_kw))
        self.members = nn.ModuleList(ms)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, z: Tensor, text: Tensor, members: list[int] | None = None) -> Tensor:
        """All (or the chosen) members' predictions ``[N, B]``."""
        idx = range(len(self.members)) if members is None else members
        return torch.stack([self.members[i](z, text) for i in idx])


# ------------------------------------------------------------------------------------------ reward component
class LRMReward:
    """``reward: lrm`` — a (trained) ensemble latent reward model as a differentiable latent-space reward.

    Args:
        path: folder written by :meth:`save` (``trl-video bench velr.pretrain` (benchmarks/velr of the repository)`); if omitted the ensemble
            is built with random weights when the shapes are known (VELR's loss does it; warns).
        aggregation: mean | min | max over the members (paper Eq. 7).
        members, widths, heads, layers, seed: architecture of a freshly built ensemble.
        text_model: model whose frozen text encoder embeds the prompts when no encoder is attached
            (default: the one recorded in the saved LRM). VELR attaches its policy's ``encode_prompts``.
    """

    name = "lrm"
    space = "latent"
    differentiable = True

    def __init__(self, path: str | None = None, aggregation: str = "mean", members: int = 10,
                 widths: list[int] | tuple[int, ...] = (32, 64, 128), heads: int = 4, layers: int = 2,
                 seed: int = 0, text_model: str | None = None):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"lrm aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")
        self.aggregation = aggregation
        self.arch = {"members": int(members), "widths": [int(w) for w in widths], "heads": int(heads),
                     "layers": int(layers), "seed": int(seed)}
        self.meta: dict[str, Any] = {}
        self.ensemble: LRMEnsemble | None = None
        self.text_model = text_model
        self._encode: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None
        self.path = path
        if path is not None:
            self._load(path)

    # ---- construction / persistence
    def ensure_built(self, latent_shape: tuple[int, ...], text_dim: int) -> LRMEnsemble:
        if self.ensemble is None:
            c, f, h, w = latent_shape
            self.meta.update({"latent_shape": [int(v) for v in latent_shape], "text_dim": int(text_dim)})
            self.ensemble = LRMEnsemble(self.arch["members"], self.arch["seed"], latent_channels=c,
                                        text_dim=text_dim, latent_grid=(f, h, w), widths=tuple(self.arch["widths"]),
                                        heads=self.arch["heads"], layers=self.arch["layers"])
        else:
            want = tuple(self.meta.get("latent_shape", ()))
            if want and want[0] != latent_shape[0]:
                raise ValueError(f"LRM expects {want[0]} latent channels, the policy has {latent_shape[0]}")
            if self.meta.get("text_dim") not in (None, text_dim):
                raise ValueError(f"LRM expects text dim {self.meta['text_dim']}, the policy's encoder gives {text_dim}")
        return self.ensemble

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        assert self.ensemble is not None
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.ensemble.state_dict().items()}
        save_file(state, str(p / "lrm.safetensors"))
        cfg = {"arch": self.arch, "aggregation": self.aggregation, **self.meta, **(extra or {})}
        (p / "lrm_config.json").write_text(json.dumps(cfg, indent=2))

    def _load(self, path: str) -> None:
        from safetensors.torch import load_file

        p = Path(path).expanduser()
        if not (p / "lrm_config.json").exists():
            raise FileNotFoundError(f"lrm: '{p}' holds no lrm_config.json (train one with "
                                    f"`trl-video bench velr.pretrain` (benchmarks/velr of the repository))")
        cfg = json.loads((p / "lrm_config.json").read_text())
        self.arch = cfg["arch"]
        self.meta = {k: v for k, v in cfg.items() if k not in ("arch", "aggregation")}
        self.text_model = self.text_model or cfg.get("text_model")
        self.ensure_built(tuple(cfg["latent_shape"]), int(cfg["text_dim"]))
        assert self.ensemble is not None
        self.ensemble.load_state_dict(load_file(str(p / "lrm.safetensors")))

    # ---- text side
    def attach_text_encoder(self, encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> None:
        """``encode(prompts) -> (embeds [B, L, D], mask [B, L])``, e.g. ``policy.encode_prompts``."""
        self._encode = encode

    def text_tokens(self, prompts: list[str], device: torch.device) -> Tensor:
        if self._encode is None:
            if not self.text_model:
                raise RuntimeError("lrm: no text encoder attached and no text_model recorded; pass "
                                   "reward_args {text_model: <the policy model>} or use it through VELR")
            from trl_video.models.policy import load_policy

            warnings.warn(f"lrm: loading the text encoder of '{self.text_model}' to embed prompts", stacklevel=2)
            pol = load_policy(self.text_model)
            pol.transformer = None  # type: ignore[assignment]  # only the text side is kept
            pol.vae = None  # type: ignore[assignment]
            pol.text_encoder.to(device)
            self._encode = lambda ps: _encode_text(pol, ps, device)
        emb, mask = self._encode(prompts)
        return last_token(emb, mask).to(device).float()

    # ---- scoring
    def member_predictions(self, latents: Tensor, prompts: list[str], members: list[int] | None = None) -> Tensor:
        """``[N, B]`` with gradients to the LRM parameters (training)."""
        if self.ensemble is None:
            raise RuntimeError("lrm: the ensemble is not built yet (no path and no shapes known)")
        text = self.text_tokens(prompts, latents.device)
        return self.ensemble(latents.float(), text, members)

    def predict(self, latents: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``(aggregate [B], variance [B], members [N, B])``; gradients reach the latents, never the
        LRM parameters."""
        if self.ensemble is None:
            raise RuntimeError("lrm: the ensemble is not built yet (no path and no shapes known)")
        with frozen_params(self.ensemble):
            preds = self.member_predictions(latents, prompts)
        return aggregate(preds, self.aggregation), member_variance(preds.detach()), preds

    def __call__(self, inputs: Tensor, prompts: list[str]) -> Tensor:
        return self.predict(inputs, prompts)[0]


@torch.no_grad()
def _encode_text(policy: Any, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    tok = policy.tokenizer(prompts, padding="max_length", max_length=policy.max_text_len, truncation=True,
                           return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    emb = policy.text_encoder(ids, attention_mask=mask).last_hidden_state
    return emb * mask.unsqueeze(-1).to(emb.dtype), mask
