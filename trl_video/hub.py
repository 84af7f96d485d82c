"""Model card (TRL's ``generate_model_card``) and Hub push (huggingface_hub's ``HfApi``). No token is ever printed
or logged.

The card is TRL's: ``trl.trainer.utils.generate_model_card`` renders its template (base model, "trained with
<method>, a method introduced in <paper>", framework versions, the method's and TRL's citations) with the tags
``trl``, ``trl-video``. Two parts of TRL's language-model template do not fit a video pipeline and are replaced: the
quick start (a diffusers ``DiffusionPipeline`` instead of a transformers text-generation pipeline) and the card
metadata's ``library_name`` (diffusers, with ``pipeline_tag: text-to-video``). trl-video adds the recipe, the
components and, once evaluated, the results as the card's ``model-index`` (what ``evaluate.push_to_hub`` writes).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import TrlVideoError

VERSIONED = ("trl-video", "diffusers", "accelerate", "peft")
TAGS = ("trl", "trl-video", "video", "text-to-video", "reinforcement-learning")
REPO_URL = "https://github.com/trl-video/trl-video"


def _paper(citation: str) -> tuple[str | None, str | None]:
    """(title, arXiv id) read from a BibTeX entry, for TRL's "a method introduced in [title](papers/id)"."""
    title = re.search(r"title\s*=\s*\{+([^{}]+)\}", citation or "")
    arxiv = re.search(r"(\d{4}\.\d{4,5})", citation or "")
    return (title.group(1).strip() if title else None), (arxiv.group(1) if arxiv else None)


def _replace_between(text: str, start: str, end: str, new: str) -> str:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:  # TRL's template changed: keep its text rather than fail the save
        return text
    return text[:i + len(start)] + new + text[j:]


def _tracker_url(trainer: Any, name: str) -> str | None:
    for tracker in getattr(trainer.accelerator, "trackers", []) or []:
        if getattr(tracker, "name", None) == name:
            run = getattr(tracker, "run", None)
            url = getattr(run, "url", None) or getattr(run, "get_url", lambda: None)()
            return str(url) if url else None
    return None


def build_model_card(*, base_model: str, model_name: str, repo_id: str | None, method: Any, reward: str, steps: int,
                     components: str, recipe: dict[str, Any], lora: bool, dataset: str | None = None,
                     plugins: Sequence[tuple[str, str]] = (), wandb_url: str | None = None,
                     trackio_url: str | None = None) -> Any:
    """A ``huggingface_hub.ModelCard`` from TRL's ``generate_model_card`` for a trained video pipeline."""
    from trl.trainer.utils import generate_model_card

    from .models.presets import HUB_ALIASES

    base = HUB_ALIASES.get(base_model, base_model)
    on_hub = base.count("/") == 1 and not base.startswith((".", "/"))
    title, paper_id = _paper(method.citation)
    card = generate_model_card(
        base_model=base, model_name=model_name, hub_model_id=repo_id or "path/to/this/folder",
        dataset_name=dataset, tags=[*TAGS, f"trl-video-{method.name}"], wandb_url=wandb_url, trackio_url=trackio_url,
        trainer_name=method.name, trainer_citation=method.citation or None, paper_title=title, paper_id=paper_id)
    data: Any = card.data  # a ModelCardData (CardData's fields are untyped)
    data.library_name = "diffusers"
    data.pipeline_tag = "text-to-video"
    if not on_hub:  # a local preset / folder: no hub link, no base_model metadata
        data.base_model = None
    text = card.text
    if not on_hub:
        text = text.replace(f"[{base}](https://huggingface.co/{base})", f"`{base}`")
    text = text.replace("It has been trained using [TRL](https://github.com/huggingface/trl).",
                        f"It has been trained using [trl-video]({REPO_URL}), a plugin-based extension of "
                        f"[TRL](https://github.com/huggingface/trl) for video diffusion models.")
    lora_note = ("\nThe LoRA adapter alone is in `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(...)` on "
                 "the base model).\n") if lora else ""
    quick = (f"```python\nfrom diffusers import DiffusionPipeline\n\n"
             f"pipe = DiffusionPipeline.from_pretrained(\"{repo_id or 'path/to/this/folder'}\")\n"
             f"video = pipe(\"a red circle moving left on a dark background\").frames[0]\n```\n{lora_note}\n")
    text = _replace_between(text, "## Quick start\n\n", "## Training procedure", quick)
    details = (f"\n\n* Method: `{method.name}` — {method.description}\n* Paper: {method.paper or 'n/a'}\n"
               f"* Reward: `{reward}`\n* Steps: {steps}\n* Components: {components}\n\n"
               f"### Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False).strip()}\n```\n\n")
    i = text.find("### Framework versions")
    if i >= 0:
        text = text[:i].rstrip() + details + text[i:]
    versions = []
    for name in VERSIONED:
        try:
            versions.append(f"- {name}: {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    versions += [f"- {dist} (plugin): {ver}" for dist, ver in plugins]
    text = text.replace("- Tokenizers:", "\n".join(versions) + "\n- Tokenizers:", 1)
    card.text = text
    return card


def write_model_card(folder: str | Path, trainer: Any, repo_id: str | None = None) -> Path:
    cfg = trainer.config
    spec = trainer.plan.method
    plugins = sorted({(i.distribution, i.version) for i in trainer.plan.infos.values()
                      if i.distribution not in ("trl-video", "<dotted path>")})
    prompts = cfg.prompts
    dataset = prompts if prompts.count("/") == 1 and not prompts.startswith((".", "/")) and \
        not Path(prompts).suffix else None
    card = build_model_card(
        base_model=cfg.model, model_name=repo_id or Path(cfg.output_dir).name, repo_id=repo_id, method=spec,
        reward=cfg.reward, steps=trainer.global_step,
        components=", ".join(f"{k}={v[0]}" for k, v in trainer.plan.components.items()),
        recipe=trainer.written_recipe()["recipe"], lora=trainer.policy.uses_lora, dataset=dataset, plugins=plugins,
        wandb_url=_tracker_url(trainer, "wandb"), trackio_url=_tracker_url(trainer, "trackio"))
    path = Path(folder) / "README.md"
    card.save(str(path))
    results = Path(folder).parent / "eval" / "eval_results.json"
    if results.exists():
        record_eval_results(Path(folder), json.loads(results.read_text()))
    return path


def eval_results_for_card(results: dict[str, Any]) -> list[Any]:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) for a trl-video evaluation: each reward
    before / after / gain (+ s.e.), the Frechet distances and the diversity, on the evaluation prompts."""
    from huggingface_hub import EvalResult

    prompts = str(results.get("prompts_source", "world:heldout"))
    common: dict[str, Any] = dict(task_type="text-to-video", task_name="Text-to-video", dataset_type=prompts, dataset_name=prompts,
                  dataset_split=f"{results.get('num_prompts', '?')} (prompt, seed) pairs")
    metrics = results.get("metrics") or {}
    out = []
    for name, rg in (metrics.get("reward_gain") or {}).items():
        for key, label in (("before", "before"), ("after", "after"), ("gain", "gain"), ("gain_sem", "gain s.e.")):
            if isinstance(rg.get(key), (int, float)):
                out.append(EvalResult(metric_type=f"reward_{key}", metric_name=f"{name} reward {label}",
                                      metric_value=round(float(rg[key]), 6), metric_config=name, **common))
    for key, value in (metrics.get("frechet_distance") or {}).items():
        if isinstance(value, (int, float)):
            out.append(EvalResult(metric_type="frechet_distance", metric_name=f"Frechet distance ({key})",
                                  metric_value=round(float(value), 6), metric_config=key, **common))
    for key, value in ((metrics.get("diversity") or {}).get("after") or {}).items():
        if key.startswith("diversity") and not key.endswith("sem") and isinstance(value, (int, float)):
            out.append(EvalResult(metric_type=key, metric_name=key.replace("_", " "),
                                  metric_value=round(float(value), 6), **common))
    return out


def record_eval_results(folder: Path, results: dict[str, Any]) -> None:
    """Write the evaluation into the card's metadata as ``model-index`` (replacing an earlier one)."""
    from huggingface_hub import ModelCard

    path = folder / "README.md"
    if not path.exists():
        return
    card = ModelCard.load(str(path))
    card.data.eval_results = eval_results_for_card(results) or None
    if card.data.eval_results and not getattr(card.data, "model_name", None):
        card.data.model_name = folder.parent.name
    card.save(str(path))


def push_folder(folder: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None,
                token: str | None = None, commit_message: str = "Upload video model trained with trl-video") -> str:
    """Record the run's evaluation in the card (if any), create the repo (if needed) and upload the folder.
    Returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise TrlVideoError(f"'{folder}' is not a saved model folder (no model_index.json)")
    results = folder.parent / "eval" / "eval_results.json"
    if results.exists():
        record_eval_results(folder, json.loads(results.read_text()))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    except Exception as exc:  # never include headers/tokens: the exception text is the server's message only
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise TrlVideoError(f"push to '{repo_id}' failed: {type(exc).__name__}: {msg}") from exc
    return str(url)
