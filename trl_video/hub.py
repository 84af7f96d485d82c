"""Model card and Hub push (huggingface_hub's ModelCard / HfApi). No token is ever printed or logged."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Any

import yaml

from .errors import TrlVideoError

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
VERSIONED = ("trl-video", "trl", "diffusers", "transformers", "accelerate", "peft", "torch", "datasets")


def _versions(extra: list[tuple[str, str]]) -> str:
    rows = []
    for name in VERSIONED:
        try:
            rows.append(f"- {name}: {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    rows += [f"- {dist} (plugin): {ver}" for dist, ver in extra]
    return "\n".join(rows)


def write_model_card(folder: str | Path, trainer: Any, repo_id: str | None = None) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = trainer.config
    spec = trainer.plan.method
    plugins = sorted({(i.distribution, i.version) for i in trainer.plan.infos.values()
                      if i.distribution not in ("trl-video", "<dotted path>")})
    base = cfg.model
    from .models.presets import HUB_ALIASES

    base = HUB_ALIASES.get(base, base)
    data = ModelCardData(base_model=base if "/" in base else None, library_name="diffusers",
                         pipeline_tag="text-to-video", license="apache-2.0",
                         tags=["trl-video", f"trl-video-{spec.name}", "video", "reinforcement-learning"])
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=repo_id or Path(cfg.output_dir).name, base_model=base,
        method=spec.name, method_description=spec.description, method_paper=spec.paper,
        citation=spec.citation or "n/a", reward=cfg.reward, steps=trainer.global_step,
        components=", ".join(f"{k}={v[0]}" for k, v in trainer.plan.components.items()),
        repo_id=repo_id or "path/to/this/folder", lora=trainer.policy.uses_lora,
        recipe_yaml=yaml.safe_dump(trainer.recipe, sort_keys=False).strip(), versions=_versions(plugins))
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


def push_folder(folder: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None,
                token: str | None = None, commit_message: str = "Upload video model trained with trl-video") -> str:
    """Create the repo (if needed) and upload the folder. Returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise TrlVideoError(f"'{folder}' is not a saved model folder (no model_index.json)")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except Exception as exc:  # never include headers/tokens: the exception text is the server's message only
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TrlVideoError(f"push to '{repo_id}' failed: {type(exc).__name__}: {msg}") from exc
    return str(url)
