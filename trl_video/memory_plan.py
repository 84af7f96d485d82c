"""Memory plan: will a recipe fit on N GPUs of M GiB? (``trl-video plan --recipe R.yaml --gpus 8 --gpu-mem 80``).

1. The recipe's real model is built on the meta device from its config (no weights, no hub: the configs of
   Wan2.1-T2V-1.3B/14B and CogVideoX-2B/5B ship in ``trl_video/assets/configs``; a local diffusers folder's own
   ``config.json`` files and the tiny presets work too), with the recipe's LoRA adapter, and every parameter counted.
2. Bytes per rank follow the recipe's setting: frozen weights in the compute dtype (``mixed_precision``),
   trainable weights kept in fp32 with fp32 gradients, AdamW's two fp32 moments and an fp32 EMA copy; a frozen
   reference copy for full fine-tuning; auxiliary trainables the method's loss declares (``planned_trainables``);
   all divided by the FSDP shard group when ``fsdp`` is on, plus the gathered blocks FSDP holds at a time.
3. Activations are *measured*: the real transformer (1 and 2 blocks, real widths) runs forward on CPU at two small
   token counts while ``saved_tensors_hooks`` records the bytes autograd keeps for backward; a straight line in the
   token count per block (and for the rest of the network) is scaled to the recipe's tokens. With gradient
   checkpointing a block keeps only its input, and one block's activations are rebuilt at a time. The VAE decoder is
   measured the same way per output pixel when the reward's gradient flows through decoded pixels.

Not modelled: allocator fragmentation and CUDA context (``--reserve`` GiB, default 2), sequence parallelism,
activation offloading. ``trl-video bench memory-plan`` compares the planned peak with the measured CPU peak of a
real training step on the tiny models.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TrlVideoError

CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "configs"
GIB = 1024 ** 3
DTYPE_BYTES = {"no": 4, "bf16": 2, "fp16": 2}
MEASURE_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.bfloat16}  # CPU: bf16 stands for fp16


# ------------------------------------------------------------------------------------------------ model configs
@dataclass
class ModelSpec:
    """Configs of a pipeline's three networks, enough to build them on the meta device."""

    name: str
    family: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    defaults: dict[str, int]
    source: str = ""
    tiny: bool = False


def shipped_specs() -> dict[str, ModelSpec]:
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        spec = ModelSpec(path.stem, data["family"], data["transformer"], data["vae"], data["text_encoder"],
                         data["defaults"], data.get("source", ""))
        out[path.stem] = spec
        out[data["hub_id"]] = spec
    return out


def find_spec(model: str) -> ModelSpec:
    """The recipe's ``model``: a shipped config (hub id or alias), a tiny preset, or a local diffusers folder."""
    from .models.presets import HUB_ALIASES, PRESETS

    specs = shipped_specs()
    key = HUB_ALIASES.get(model, model)
    if key in specs:
        return specs[key]
    if model in PRESETS and model.startswith("tiny-"):
        from .models import presets

        family = "wan" if "wan" in model else "cogvideox"
        with torch.device("meta"):
            comps = presets.tiny_wan_components() if family == "wan" else presets.tiny_cogvideox_components()
        from . import world

        tr, vae = comps["transformer"], comps["vae"]
        return ModelSpec(model, family, {**tr.config, "_class_name": type(tr).__name__},
                         {**vae.config, "_class_name": type(vae).__name__},
                         None, dict(num_frames=world.NUM_FRAMES, height=world.SIZE, width=world.SIZE,
                                    max_text_len=presets.TINY_TEXT_LEN), "trl_video.models.presets", tiny=True)
    folder = Path(model).expanduser()
    if (folder / "model_index.json").is_file():
        index = json.loads((folder / "model_index.json").read_text())
        pipeline = index.get("_class_name", "")
        if pipeline not in ("WanPipeline", "CogVideoXPipeline"):
            raise TrlVideoError(f"{folder}/model_index.json: unsupported pipeline '{index.get('_class_name')}'")
        family = "wan" if pipeline == "WanPipeline" else "cogvideox"

        def read(sub: str) -> dict[str, Any]:
            return json.loads((folder / sub / "config.json").read_text())

        meta_path = folder / "trl_video.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        dflt = {"wan": dict(num_frames=81, height=480, width=832, max_text_len=512),
                "cogvideox": dict(num_frames=49, height=480, width=720, max_text_len=226)}[family]
        return ModelSpec(folder.name, family, read("transformer"), read("vae"), read("text_encoder"),
                         {k: meta.get(k, v) for k, v in dflt.items()}, str(folder))
    known = sorted({s.name for s in specs.values()})
    raise TrlVideoError(f"model '{model}': no config to plan from (shipped: {', '.join(known)}; or a tiny preset, "
                        f"or a local diffusers folder)")


def _from_config(cfg: dict[str, Any], **overrides: Any) -> Any:
    """The diffusers model named by ``cfg["_class_name"]``, built from the rest of ``cfg``. Typed ``Any``: diffusers'
    ``from_config`` is ``(*args, **kwargs) -> Any`` and mypy does not see its models' decorated methods
    (``decode``) at all."""
    import diffusers

    cls = getattr(diffusers, cfg["_class_name"])
    return cls.from_config({**{k: v for k, v in cfg.items() if not k.startswith("_")}, **overrides})


def build_transformer(spec: ModelSpec, **overrides: Any) -> nn.Module:
    transformer: nn.Module = _from_config(spec.transformer, **overrides)
    return transformer


def build_vae(spec: ModelSpec) -> Any:
    """A diffusers ``AutoencoderKL*`` (``Any`` for its ``decode``, see :func:`_from_config`)."""
    return _from_config(spec.vae)


def build_text_encoder(spec: ModelSpec) -> nn.Module:
    if spec.text_encoder is None:  # tiny presets: the encoder the preset builds
        from . import world
        from .models.presets import TINY_TEXT_DIM
        from .models.text import build_text_encoder as tiny

        return tiny(spec.family, vocab_size=len(world.WORDS) + 3, d_model=TINY_TEXT_DIM)
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(spec.text_encoder)
    if cfg.pop("model_type") == "umt5":
        return UMT5EncoderModel(UMT5Config(**cfg))
    return T5EncoderModel(T5Config(**cfg))


def numel(module: nn.Module | None, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def add_lora(transformer: nn.Module, lora_config: Any) -> None:
    """The recipe's adapter (the peft ``LoraConfig`` the trainer adds) on a meta or real transformer."""
    from .models.policy import add_lora_adapter

    add_lora_adapter(transformer, copy.deepcopy(lora_config))


def block_sizes(transformer: nn.Module) -> tuple[int, int, int]:
    """(number of blocks, params of the largest block, trainable params of it)."""
    from .sharding import block_class_names

    names = block_class_names(transformer)
    blocks = [m for m in transformer.modules() if type(m).__name__ in names and m is not transformer]
    if not blocks:
        return 0, 0, 0
    big = max(blocks, key=numel)
    return len(blocks), numel(big), numel(big, trainable=True)


# ------------------------------------------------------------------------------------------------ activations
@contextlib.contextmanager
def saved_bytes(exclude: list[torch.Tensor]) -> Iterator[list[int]]:
    """Bytes of the distinct storages autograd saves for backward inside the block (parameters excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


def _latent_grid(spec: ModelSpec, tokens_side: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a small probe with ``tokens_side`` patches per side."""
    cfg = spec.transformer
    p = cfg["patch_size"]
    ph = p[1] if isinstance(p, (list, tuple)) else p
    return 2, tokens_side * ph, tokens_side * ph


def recipe_tokens(spec: ModelSpec, num_frames: int, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
    """Video tokens the transformer sees for a recipe's clip size, and the latent grid."""
    if spec.family == "wan":
        tf, sf = spec.vae.get("scale_factor_temporal", 4), spec.vae.get("scale_factor_spatial", 8)
    else:
        tf, sf = spec.vae.get("temporal_compression_ratio", 4), 2 ** (len(spec.vae["block_out_channels"]) - 1)
    grid = ((num_frames - 1) // tf + 1, height // sf, width // sf)
    p = spec.transformer["patch_size"]
    pt, ph = (p[0], p[1]) if isinstance(p, (list, tuple)) else (1, p)
    return (grid[0] // pt) * (grid[1] // ph) * (grid[2] // ph), grid


def _probe_inputs(spec: ModelSpec, grid: tuple[int, int, int], dtype: torch.dtype, text_len: int,
                  batch: int = 1) -> dict[str, Any]:
    f, h, w = grid
    c = spec.transformer["in_channels"]
    if spec.family == "wan":
        return dict(hidden_states=torch.randn(batch, c, f, h, w, dtype=dtype),
                    timestep=torch.full((batch,), 500.0, dtype=dtype),
                    encoder_hidden_states=torch.randn(batch, text_len, spec.transformer["text_dim"], dtype=dtype),
                    return_dict=False)
    return dict(hidden_states=torch.randn(batch, f, c, h, w, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, text_len, spec.transformer["text_embed_dim"], dtype=dtype),
                timestep=torch.full((batch,), 500, dtype=torch.long), return_dict=False)


def _tokens(spec: ModelSpec, grid: tuple[int, int, int]) -> int:
    p = spec.transformer["patch_size"]
    pt, ph = (p[0], p[1]) if isinstance(p, (list, tuple)) else (1, p)
    return (grid[0] // pt) * (grid[1] // ph) * (grid[2] // ph)


@dataclass
class ActivationFit:
    """Saved bytes per sample: ``block_a + block_b * L`` per block, ``rest_a + rest_b * L`` for the rest."""

    block_a: float
    block_b: float
    rest_a: float
    rest_b: float
    points: list[tuple[int, int, int]] = field(default_factory=list)  # (layers, tokens, bytes)

    def block(self, tokens: int) -> float:
        return max(self.block_a + self.block_b * tokens, 0.0)

    def rest(self, tokens: int) -> float:
        return max(self.rest_a + self.rest_b * tokens, 0.0)


def measure_transformer_activations(spec: ModelSpec, dtype: torch.dtype, lora: Any,
                                    text_len: int, sides: tuple[int, int] = (4, 8)) -> ActivationFit:
    """Run the real transformer with 1 and 2 blocks at two token counts (CPU, real widths) and fit the bytes
    autograd keeps per block and for the rest of the network."""
    points = []
    for layers in (1, 2):
        torch.manual_seed(0)
        net = build_transformer(spec, num_layers=layers).to(dtype)
        if lora:
            add_lora(net, lora)
            net.to(dtype)
        else:
            net.requires_grad_(True)
        params = list(net.parameters()) + list(net.buffers())
        for side in sides:
            grid = _latent_grid(spec, side)
            inputs = _probe_inputs(spec, grid, dtype, text_len)
            with saved_bytes(params) as total:
                out = net(**inputs)[0]
            points.append((layers, _tokens(spec, grid), total[0]))
            del out
        del net
    (l1a, t_a, b1a), (l1b, t_b, b1b), (l2a, _, b2a), (l2b, _, b2b) = points
    block_small, block_big = b2a - b1a, b2b - b1b
    bb = (block_big - block_small) / (t_b - t_a)
    ba = block_small - bb * t_a
    rest_small, rest_big = b1a - block_small, b1b - block_big
    rb = (rest_big - rest_small) / (t_b - t_a)
    ra = rest_small - rb * t_a
    return ActivationFit(ba, bb, ra, rb, points)


def measure_vae_decode(spec: ModelSpec, dtype: torch.dtype, sides: tuple[int, int] = (2, 4)) -> tuple[float, float]:
    """Bytes the VAE decoder keeps for backward per output pixel (slope, intercept) from two small latents."""
    torch.manual_seed(0)
    vae = build_vae(spec).to(dtype)
    vae.requires_grad_(False)
    ch = int(spec.vae.get("z_dim") or spec.vae["latent_channels"])  # Wan's and CogVideoX's names for it
    pts = []
    for side in sides:
        z = torch.randn(1, ch, 2, side, side, dtype=dtype, requires_grad=True)
        with saved_bytes(list(vae.parameters()) + list(vae.buffers())) as total:
            out = vae.decode(z).sample
        pts.append((out[0, 0].numel(), total[0]))
        del out
    (p1, b1), (p2, b2) = pts
    slope = (b2 - b1) / (p2 - p1)
    return slope, b1 - slope * p1


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Row:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    model: str
    gpus: int
    gpu_mem_gib: float
    reserve_gib: float
    rows: list[Row]
    assumptions: list[str]

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= (self.gpu_mem_gib - self.reserve_gib) * GIB

    def table(self) -> str:
        unit, div = ("GiB", GIB) if self.total >= GIB / 4 else ("MiB", 2 ** 20)
        w = max(len(r.name) for r in self.rows) + 2
        lines = [f"memory plan: {self.model} on {self.gpus} GPU(s) x {self.gpu_mem_gib:g} GiB (per rank)"]
        lines += [f"  {a}" for a in self.assumptions]
        lines.append(f"  {'component':<{w}}{unit + '/rank':>10}  note")
        for r in self.rows:
            lines.append(f"  {r.name:<{w}}{r.bytes / div:>10.2f}  {r.note}")
        lines.append(f"  {'total':<{w}}{self.total / div:>10.2f}  + {self.reserve_gib:g} GiB reserve (CUDA context, "
                     f"fragmentation)")
        budget = self.gpu_mem_gib - self.reserve_gib
        verdict = "fits" if self.fits else "does not fit"
        lines.append(f"{verdict}: {self.total / GIB:.2f} GiB planned of {budget:g} GiB usable per GPU")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "gpus": self.gpus, "gpu_mem_gib": self.gpu_mem_gib, "fits": self.fits,
                "total_bytes": self.total, "rows": [r.__dict__ for r in self.rows], "assumptions": self.assumptions}


def _loss_class(config: Any, registry: Any) -> Any:
    from .plan import resolve_plan

    plan = resolve_plan(config, registry)
    return plan, registry.get("loss", plan.components["loss"][0]).obj


def plan_memory(config: Any, gpus: int = 1, gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0,
                fsdp: bool | None = None, registry: Any = None, grad_forwards: int | None = None,
                measure: bool = True) -> MemoryPlan:
    """The memory plan of ``config`` (a :class:`VideoRewardConfig`) on ``gpus`` ranks."""
    from .plugins import get_registry
    from .sharding import can_shard, fsdp_options

    registry = registry or get_registry()
    spec = find_spec(config.model)
    plan, loss_cls = _loss_class(config, registry)
    fsdp = bool(config.fsdp) if fsdp is None else fsdp
    shard = 1
    if fsdp and gpus > 1:
        size = fsdp_options(config)["shard_size"] or gpus
        shard = size
    comp = DTYPE_BYTES[config.mixed_precision]
    frames = config.num_frames or spec.defaults["num_frames"]
    height, width = config.height or spec.defaults["height"], config.width or spec.defaults["width"]
    text_len = spec.defaults["max_text_len"]
    if config.global_batch % gpus:
        raise TrlVideoError(f"prompts_per_step*group_size = {config.global_batch} is not divisible by --gpus {gpus}")
    micro = config.global_batch // gpus

    with torch.device("meta"):
        transformer = build_transformer(spec)
        vae, text = build_vae(spec), build_text_encoder(spec)
        lora = config.peft_config()  # trl.get_peft_config: the LoraConfig the trainer adds, or None
        if lora is not None:
            add_lora(transformer, lora)
        else:
            transformer.requires_grad_(True)
        planned = getattr(loss_cls, "planned_trainables", None)
        aux: dict[str, nn.Module] = planned(config, plan.method_config, transformer) if planned else {}
    n_all, n_tr = numel(transformer), numel(transformer, trainable=True)
    n_blocks, blk, blk_tr = block_sizes(transformer)
    rows: list[Row] = []
    div = shard if fsdp else 1
    where = f"/ {div} (FSDP)" if div > 1 else "replicated"
    rows.append(Row("transformer frozen weights", (n_all - n_tr) * comp / div,
                    f"{(n_all - n_tr) / 1e9:.3f} B params x {comp} B, {where}"))
    rows.append(Row("transformer trainable (fp32)", n_tr * 4 / div, f"{n_tr / 1e6:.1f} M params"
                    + (f" (LoRA r={config.lora_r})" if lora is not None else " (full fine-tuning)")))
    rows.append(Row("gradients (fp32)", n_tr * 4 / div, ""))
    rows.append(Row("AdamW moments (fp32)", n_tr * 8 / div, "exp_avg + exp_avg_sq"))
    if config.ema_decay:
        rows.append(Row("EMA copy (fp32)", n_tr * 4 / div, f"decay {config.ema_decay}"))
    if lora is None:
        rows.append(Row("reference (frozen copy)", n_all * comp / div, "full fine-tuning: the KL/teacher model"))
    if comp < 4 and n_tr:
        rows.append(Row("autocast weight copies", n_tr * comp / div, "low-precision casts of fp32 trainables"))
    for name, mod in aux.items():
        a_all, a_tr = numel(mod), numel(mod, trainable=True)
        d = div if (fsdp and can_shard(mod)) else 1
        rows.append(Row(f"{name} (auxiliary)", ((a_all - a_tr) * comp + a_tr * (4 + 4 + 8)) / d,
                        f"{a_all / 1e9:.3f} B params, {a_tr / 1e6:.1f} M trainable (weights+grad+AdamW)"
                        + (f", / {d}" if d > 1 else "")))
    if fsdp and div > 1:
        gathered = 2 * ((blk - blk_tr) * comp + blk_tr * 4) + blk_tr * 4
        rows.append(Row("FSDP gathered blocks", gathered, "2 unsharded blocks (current + prefetch) + 1 block's "
                                                          "unsharded grads"))
    rows.append(Row("VAE weights", numel(vae) * comp, f"{numel(vae) / 1e6:.0f} M params, replicated"))
    rows.append(Row("text encoder weights", numel(text) * comp, f"{numel(text) / 1e9:.2f} B params, replicated"))

    tokens, _ = recipe_tokens(spec, frames, height, width)
    sampler_args = dict(plan.components["sampler"][1])
    sample_grad = bool(getattr(loss_cls, "sample_grad", False))
    if grad_forwards is None:
        grad_forwards = int(sampler_args.get("grad_steps", 1)) if sample_grad else 1
        if sample_grad and sampler_args.get("checkpointing"):
            grad_forwards = 1
    assumptions = [f"clip {frames}x{height}x{width} -> {tokens} video tokens; {text_len} text tokens; "
                   f"micro-batch {micro} per rank (global {config.global_batch})",
                   f"precision: frozen weights {'fp32' if comp == 4 else config.mixed_precision}, trainables fp32; "
                   f"{'FSDP over ' + str(div) + ' ranks' if div > 1 else 'no sharding (DDP)' if gpus > 1 else '1 GPU'}"
                   f"; gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}",
                   f"transformer forwards holding a graph at the peak: {grad_forwards}"]
    if measure:
        dtype = MEASURE_DTYPE[config.mixed_precision]
        fit = measure_transformer_activations(spec, dtype, lora, text_len)
        hidden = spec.transformer["num_attention_heads"] * spec.transformer["attention_head_dim"]
        if config.gradient_checkpointing:
            per_fwd = n_blocks * tokens * hidden * comp + fit.block(tokens) + fit.rest(tokens)
            how = f"checkpointed: {n_blocks} block inputs + 1 block rebuilt ({fit.block(tokens) / GIB:.2f} GiB)"
        else:
            per_fwd = n_blocks * fit.block(tokens) + fit.rest(tokens)
            how = f"{n_blocks} blocks x {fit.block(tokens) / GIB:.3f} GiB + rest {fit.rest(tokens) / GIB:.3f} GiB"
        rows.append(Row("transformer activations", grad_forwards * micro * per_fwd,
                        f"measured {fit.block_b / 1024:.1f} KiB/token/block; {how}; x {grad_forwards} fwd x {micro}"))
        reward_grad = sample_grad and bool(getattr(loss_cls, "reward_grad", False))
        reward_space = _reward_space(config, registry)
        if reward_grad and reward_space == "pixel":
            slope, icpt = measure_vae_decode(spec, dtype)
            pixels = frames * height * width
            rows.append(Row("VAE decode activations", micro * max(slope * pixels + icpt, 0.0),
                            f"reward gradient through pixels: measured {slope:.0f} B/pixel x {pixels / 1e6:.1f} M "
                            f"pixels x {micro}"))
    return MemoryPlan(spec.name, gpus, gpu_mem_gib, reserve_gib, rows, assumptions)


def _reward_space(config: Any, registry: Any) -> str:
    from .plan import build_reward

    try:
        reward = build_reward(registry, config.reward, dict(config.reward_args))
    except Exception:  # noqa: BLE001 - a reward needing files (an LRM folder) is scored in latent space or unknown
        return "unknown"
    return str(getattr(reward, "space", "pixel"))


def cmd_plan(args: Any) -> int:
    """``trl-video plan``."""
    from .cli import apply_overrides, load_recipe
    from .config import config_from_dict

    recipe = apply_overrides(load_recipe(args.recipe), args.set or [])
    config = config_from_dict(recipe, where=f"recipe {args.recipe}")
    if args.gpus < 1 or args.gpu_mem <= 0:
        raise TrlVideoError("--gpus must be >= 1 and --gpu-mem > 0")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = plan_memory(config, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, reserve_gib=args.reserve,
                         fsdp=True if args.fsdp else None, grad_forwards=args.grad_forwards)
    print(f"recipe {args.recipe}")
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0


def add_plan_arguments(p: Any) -> None:
    p.add_argument("--recipe", required=True)
    p.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) the run uses")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB kept free for the CUDA context / fragmentation")
    p.add_argument("--fsdp", action="store_true", help="plan with FSDP sharding even if the recipe does not set it")
    p.add_argument("--grad-forwards", type=int, help="transformer forwards holding a graph at the peak "
                                                     "(default: the sampler's grad_steps for backprop-through-sampling "
                                                     "losses, else 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--json", help="also write the plan here")


def human(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


