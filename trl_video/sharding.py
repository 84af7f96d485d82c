"""FSDP2 sharding of the transformer (and of large auxiliary transformers) with ``torch.distributed.fsdp.fully_shard``.

One code path for CPU (gloo) and GPU (NCCL): accelerate owns the process group and the device; this module
applies ``fully_shard`` per transformer block and at the root itself (accelerate's own FSDP wrapping is not used:
on CPU it silently falls back to DDP), and converts between sharded modules and the *full* state dicts the
unsharded trainer writes, so a checkpoint or an exported model does not depend on how the run was sharded.

Recognising sharded tensors: after :func:`shard_for_training`, every parameter of a sharded module is a
``torch.distributed.tensor.DTensor`` (:func:`is_sharded`). FSDP reduce-scatters (averages) their gradients
during ``backward``; a manual gradient all-reduce must skip them (:func:`replicated`). Parameters of modules that
are not sharded (small auxiliary trainables: b_phi, reward-model ensembles) stay plain tensors, replicated on
every rank, and still need that all-reduce.

Every function that gathers (:func:`full_state_dict`, :func:`optimizer_state_dict`, :func:`ema_state_dict`,
:func:`unsharded_copy`) is a collective when modules are sharded: all ranks must call it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import Tensor, nn

from .errors import TrlVideoError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import OptimizerStateType, ValueType
    from torch.distributed.tensor import DTensor

#: ``fsdp_config`` keys (recipe) with their types and defaults.
FSDP_OPTIONS: dict[str, tuple[type, Any]] = {
    "reshard_after_forward": (bool, True),  # free the gathered block after its forward (ZeRO-3); False: ZeRO-2
    "shard_size": (int, 0),  # HSDP: shard within groups of this many ranks, replicate across them; 0 = all ranks
}


def fsdp_requested(config: Any) -> bool:
    """The recipe's ``fsdp: true``, or an accelerate config / launcher with ``distributed_type: FSDP``."""
    return bool(getattr(config, "fsdp", False)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def fsdp_options(config: Any) -> dict[str, Any]:
    """Validated ``fsdp_config`` with defaults (``FSDP_RESHARD_AFTER_FORWARD`` from accelerate as a fallback)."""
    given = dict(getattr(config, "fsdp_config", None) or {})
    out = {k: default for k, (_, default) in FSDP_OPTIONS.items()}
    env = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
    if env is not None:
        out["reshard_after_forward"] = env.lower() in ("1", "true")
    for key, value in given.items():
        if key not in FSDP_OPTIONS:
            raise TrlVideoError(f"fsdp_config: unknown key '{key}' (known: {', '.join(FSDP_OPTIONS)})")
        tp = FSDP_OPTIONS[key][0]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise TrlVideoError(f"fsdp_config: key '{key}' must be {tp.__name__}, got {value!r}")
        out[key] = value
    if out["shard_size"] < 0:
        raise TrlVideoError(f"fsdp_config: key 'shard_size' must be >= 0, got {out['shard_size']}")
    return out


# ------------------------------------------------------------------------------------------------ recognising
def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """True for a DTensor (a parameter, gradient or EMA shadow of an FSDP-sharded module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def replicated(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters whose gradients still need an all-reduce (FSDP already reduce-scattered the others)."""
    return [p for p in params if not is_sharded(p)]


def local_numel(tensor: Tensor) -> int:
    """Elements this rank holds."""
    return tensor.to_local().numel() if is_sharded(tensor) else tensor.numel()


def is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def to_full(tensor: Tensor) -> Tensor:
    """The full tensor behind a DTensor (a collective); plain tensors pass through."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


# ------------------------------------------------------------------------------------------------ sharding
def block_class_names(module: nn.Module) -> set[str]:
    """Classes sharded as one unit: diffusers models name their repeated blocks in ``_no_split_modules``
    (``WanTransformerBlock``; ``CogVideoXBlock``, ``CogVideoXPatchEmbed``)."""
    return set(getattr(module, "_no_split_modules", None) or ())


def can_shard(module: nn.Module) -> bool:
    return bool(block_class_names(module))


def device_mesh(device_type: str, world_size: int, shard_size: int = 0) -> Any:
    """1-D mesh over all ranks (FSDP), or 2-D (replicate, shard) when ``shard_size`` divides the world (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size and shard_size != world_size:
        if world_size % shard_size:
            raise TrlVideoError(f"fsdp_config: shard_size {shard_size} does not divide the {world_size} processes")
        return init_device_mesh(device_type, (world_size // shard_size, shard_size),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def shard_module(module: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every block of ``module`` (classes in its ``_no_split_modules``), then the root (which takes
    the remaining parameters: embeddings, norms, the output projection). Returns the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    names = block_class_names(module)
    if not names:
        raise TrlVideoError(f"cannot shard {type(module).__name__}: it names no transformer blocks "
                            f"(_no_split_modules)")
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root keeps its gathered parameters after forward: they are needed first in backward anyway
    fully_shard(module, mesh=mesh, reshard_after_forward=False)
    return len(blocks)


@dataclass
class ShardingInfo:
    """What :func:`shard_for_training` did: blocks per sharded module, modules left replicated."""

    mesh: Any
    options: dict[str, Any]
    sharded: dict[str, int] = field(default_factory=dict)
    replicated: list[str] = field(default_factory=list)

    def describe(self) -> str:
        shape = tuple(self.mesh.shape) if self.mesh is not None else ()
        parts = [f"{n} ({b} blocks + root)" for n, b in self.sharded.items()]
        rep = f"; replicated: {', '.join(self.replicated)}" if self.replicated else ""
        return f"FSDP2 over mesh {shape}: sharded {', '.join(parts)}{rep}"


def shard_for_training(policy: Any, aux: dict[str, nn.Module], device_type: str, world_size: int,
                       options: dict[str, Any]) -> ShardingInfo:
    """Shard the policy transformer, its frozen reference copy (full fine-tuning) and every auxiliary module that
    is a block-structured transformer (e.g. DM-Align's fake score); smaller auxiliary trainables are replicated.
    Call after every module exists (the loss's ``setup`` may deep-copy the unsharded transformer) and before
    optimisers and EMA are built over the parameters (sharding replaces them with DTensors)."""
    mesh = device_mesh(device_type, world_size, options.get("shard_size", 0))
    raf = bool(options.get("reshard_after_forward", True))
    info = ShardingInfo(mesh=mesh, options=dict(options))
    info.sharded["policy"] = shard_module(policy.transformer, mesh, raf)
    reference = getattr(policy, "_frozen_reference", None)
    if reference is not None:
        info.sharded["reference"] = shard_module(reference, mesh, raf)
    for name, module in aux.items():
        if module is policy.transformer:
            continue
        if can_shard(module):
            info.sharded[name] = shard_module(module, mesh, raf)
        else:
            info.replicated.append(name)
    return info


# ------------------------------------------------------------------------------------------------ state dicts
def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _tensors(state: Mapping[str, ValueType], where: str) -> dict[str, Tensor]:
    """A model state dict's values narrowed to tensors (DCP types them as any state value; a module's are all
    tensors)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: '{key}' is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def full_state_dict(module: nn.Module, trainable_only: bool = False) -> dict[str, Tensor]:
    """Full (unsharded) CPU state dict of ``module``; keys are the unsharded module's names. With
    ``trainable_only`` only the parameters that require grad (the LoRA weights, or all of a full fine-tune).
    Sharded: a collective; the tensors land on rank 0 (other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = _tensors(get_model_state_dict(module, options=_full_options(ignore_frozen_params=trainable_only)),
                  "model state dict")
    if trainable_only:
        keep = {n for n, p in module.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Load a full state dict (every rank passes the same one) into a sharded or plain module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    values: dict[str, ValueType] = dict(state)  # DCP's parameter type is the wider state-value union
    set_model_state_dict(module, values, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimiser state in torch's own layout (``Optimizer.state_dict()``: parameters numbered in
    param-group order), whether the module is sharded or not. Sharded: a collective; rank 0 gets the state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # full_state_dict layout (DCP types it as the general OptimizerStateType union): "state" maps each parameter's
    # name to its dict of tensors/steps, "param_groups" is a list of dicts whose "params" are parameter names
    osd = cast(dict[str, Any], get_optimizer_state_dict(module, optimizer, options=_full_options()))
    if not osd or "param_groups" not in osd:
        return {}
    order = [fqn for group in osd["param_groups"] for fqn in group["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    state = {index[fqn]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for fqn, s in osd["state"].items()}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict` (every rank passes the same full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not any(is_sharded(p) for g in optimizer.param_groups for p in g["params"]):
        optimizer.load_state_dict(state)  # already torch's layout (and DCP needs existing state to place it)
        return
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = {"state": {order[int(i)]: s for i, s in state["state"].items()},
           "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, cast("OptimizerStateType", osd),  # the layout it returned above
                             options=StateDictOptions(full_state_dict=True))


def ema_state_dict(ema: Any) -> dict[str, Any]:
    """diffusers ``EMAModel.state_dict()`` with full shadow tensors (a collective when they are DTensors)."""
    state = ema.state_dict()
    state["shadow_params"] = [to_full(s).detach().cpu() for s in state["shadow_params"]]
    return state


def load_ema_state_dict(ema: Any, state: dict[str, Any]) -> None:
    """Load full shadow tensors, re-sharding each like the shadow it replaces."""
    from torch.distributed.tensor import distribute_tensor

    current = list(ema.shadow_params)
    ema.load_state_dict(state)
    shadows = []
    for old, new in zip(current, ema.shadow_params, strict=True):
        if is_sharded(old):
            new = distribute_tensor(new.to(old.device, old.dtype), old.device_mesh, old.placements)
        else:
            new = new.to(old.device, old.dtype)
        shadows.append(new)
    ema.shadow_params = shadows


# ------------------------------------------------------------------------------------------------ export
def _unsharded_class(module: nn.Module) -> Any:
    """The diffusers model class under FSDP's wrapper class (``Any``: diffusers types ``from_config`` as returning
    ``ConfigMixin | tuple``, the tuple only with ``return_unused_kwargs``, which mypy cannot tell apart)."""
    from diffusers.models.modeling_utils import ModelMixin
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    if not issubclass(cls, ModelMixin):
        raise TrlVideoError(f"cannot export {cls.__name__}: not a diffusers model (no from_config)")
    return cls


def unsharded_copy(module: nn.Module, is_main: bool) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of a sharded diffusers transformer, with its LoRA adapter if it has one, for
    export code that needs a whole module (``fuse_lora``, ``save_pretrained``, ``get_peft_model_state_dict``).
    A collective: every rank calls it; rank 0 gets the copy, the others ``None``. Built on the meta device and
    filled by assignment, so it costs one copy of the weights, in their dtypes."""
    state = full_state_dict(module)
    if not is_main:
        return None
    cls = _unsharded_class(module)
    with torch.device("meta"):
        plain = cls.from_config(module.config)
        peft_config = getattr(module, "peft_config", None) or {}
        for name, cfg in peft_config.items():
            plain.add_adapter(copy.deepcopy(cfg), adapter_name=name)
    plain.load_state_dict(state, strict=True, assign=True)
    # buffers outside the state dict (non-persistent: RoPE tables) are not sharded: copy them over
    own = dict(module.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            target = plain.get_submodule(owner) if owner else plain
            target._buffers[leaf] = own[name].detach().cpu().clone()
    requires = {n: p.requires_grad for n, p in module.named_parameters()}
    for n, p in plain.named_parameters():
        p.requires_grad_(requires.get(n, False))
    return plain.train(module.training)
