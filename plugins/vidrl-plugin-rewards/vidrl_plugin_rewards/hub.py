"""Loading reward weights by Hub id or local folder, with one-line errors naming what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trl_video.errors import TrlVideoError


def resolve_file(repo: str, filename: str, revision: str | None = None) -> str:
    """``repo`` is a local folder (the file inside it) or a Hub id (downloaded / read from the HF cache)."""
    local = Path(repo)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise TrlVideoError(f"'{repo}' has no file '{filename}'")
        return str(path)
    import os

    from huggingface_hub import hf_hub_download

    try:  # HF_ENDPOINT read now (huggingface_hub reads it once, at import)
        return hf_hub_download(repo, filename, revision=revision, endpoint=os.environ.get("HF_ENDPOINT"))
    except Exception as exc:  # offline, no such repo/file, auth...
        raise TrlVideoError(f"cannot fetch '{filename}' from '{repo}': {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def list_files(repo: str, revision: str | None = None) -> list[str]:
    """Relative paths of the files in a local folder or a Hub model repo (one-line error naming ``repo``)."""
    local = Path(repo)
    if local.is_dir():
        return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    import os

    from huggingface_hub import HfApi

    try:
        return sorted(HfApi(endpoint=os.environ.get("HF_ENDPOINT")).list_repo_files(repo, revision=revision))
    except Exception as exc:
        raise TrlVideoError(f"cannot list the files of '{repo}': {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with ``weights_only=True`` (the reward models' official .pt/.pth)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def from_pretrained(cls: Any, repo: str, what: str, **kw: Any) -> Any:
    """``cls.from_pretrained(repo)`` with a one-line error naming ``repo`` when it cannot be loaded."""
    try:
        return cls.from_pretrained(repo, **kw)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TrlVideoError(f"{what}: cannot load '{repo}' ({type(exc).__name__}: {text[:200]})") from None


def materialise_position_ids(module: torch.nn.Module) -> None:
    """A model built on the meta device and loaded with ``assign=True`` still has meta buffers for what
    checkpoints do not store (``position_ids``): rebuild them."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        parent_name, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise TrlVideoError(f"buffer '{name}' is not in the checkpoint")
        parent = module.get_submodule(parent_name) if parent_name else module
        parent.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
