"""Checkpoint integrity and resume safety.

* :func:`write_manifest` records every file of a checkpoint (size, sha256) and every tensor of its safetensors
  files (shape, dtype, read from the header); :func:`verify_checkpoint` re-checks all of it before anything is
  loaded, and :func:`select_resume_checkpoint` names the newest intact checkpoint when the latest is damaged.
* :func:`check_tensors` refuses a saved tensor whose shape or dtype differs from the model's (``copy_`` would
  broadcast it silently).
* :func:`compare_recipes` sorts the differences between the checkpoint's recipe and the current one into safe
  changes (logged) and unsafe ones (refused unless ``--accept-recipe-changes``); :func:`unacceptable_changes`
  names the unsafe ones a resumed run cannot honour (the checkpoint's state fixes them), refused even with the
  flag. An accepted change takes effect: the trainer re-applies the new optimiser hyperparameters, schedule and
  EMA decay over the restored state, and rebuilds what the changed reward or prompt list invalidates.
* :func:`truncate_metrics` drops the metrics rows logged after the checkpoint a run resumes from, so
  ``metrics.jsonl`` never repeats a step.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import TrlVideoError

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

#: config keys a resumed run may change: they do not alter what the next step computes
SAFE_RESUME_KEYS = frozenset({
    "max_steps", "logging_steps", "save_steps", "save_total_limit", "report_to", "save_model_at_end", "output_dir",
    "eval_at_end", "eval_prompts", "eval_num_prompts", "eval_num_steps", "eval_rewards",
    "push_to_hub", "hub_model_id", "hub_private",
    # how, not what: recomputation, a cache, the all-reduce bucket size give the same numbers
    "gradient_checkpointing", "text_cache_size", "grad_sync_bucket_mb",
})

#: unsafe keys that ``--accept-recipe-changes`` may take: each takes effect on the resumed run (optimiser
#: hyperparameters and the schedule are re-applied over the restored state, the EMA gets the new decay, a changed
#: reward starts without the old reward's state, a changed prompt list starts a new epoch over the new list, the
#: per-step arguments of sampler/estimator/loss/method are read from the new recipe)
ACCEPTABLE_RESUME_KEYS = frozenset({
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
    "warmup_steps", "max_grad_norm", "gradient_accumulation_steps", "ema_decay",
    "reward", "reward_args", "sampler_args", "estimator_args", "loss_args", "method_args",
    "prompts", "prompt_datasets", "prompt_column", "data.num_prompts", "data.prompts_sha256",
})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {shape, dtype} from a safetensors header (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise ValueError("header size is implausible")
        header = json.loads(f.read(n))
    return {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in header.items() if k != "__metadata__"}


def checkpoint_step(path: Path) -> int | None:
    tail = path.name[len(CHECKPOINT_PREFIX):]
    return int(tail) if path.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else None


def all_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder, oldest first, intact or not."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def write_manifest(folder: str | Path) -> Path:
    """Write ``manifest.json`` for every other file under ``folder`` (call it last, before the atomic rename)."""
    folder = Path(folder)
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = p.relative_to(folder).as_posix()
        files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        if p.suffix == ".safetensors":
            tensors[rel] = _tensor_table(p)
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files, "tensors": tensors}, indent=1))
    return path


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when the checkpoint is intact, else a short reason naming the damaged file."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return f"no {MANIFEST} (an incomplete or foreign checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta.get('size')}"
        if _sha256(p) != meta.get("sha256"):
            return f"{rel} does not match its sha256 in the manifest"
    if "trainer_state.json" not in files:
        return "trainer_state.json is not in the manifest"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step = state["global_step"]
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    if not isinstance(step, int) or step != checkpoint_step(folder):
        return f"trainer_state.json says global_step {step!r} in {folder.name}"
    return None


def select_resume_checkpoint(output_dir: str | Path, requested: str | Path | None = None) -> Path:
    """The checkpoint to resume from: ``requested`` if given, else the latest; verified either way."""
    out = Path(output_dir)
    if requested is not None:
        path = Path(requested)
        if checkpoint_step(path) is None or not path.is_dir():
            raise TrlVideoError(f"--resume '{path}' is not a checkpoint-N folder")
        problem = verify_checkpoint(path)
        if problem:
            raise TrlVideoError(f"checkpoint '{path}' is damaged: {problem}")
        return path
    cks = all_checkpoints(out)
    if not cks:
        what = "does not exist" if not out.exists() else "holds no checkpoint-N folder"
        raise TrlVideoError(f"--resume: output dir '{out}' {what}, so there is nothing to resume (drop --resume to "
                            f"start a new run)")
    latest = cks[-1]
    problem = verify_checkpoint(latest)
    if problem is None:
        return latest
    intact = next((p for p in reversed(cks[:-1]) if verify_checkpoint(p) is None), None)
    hint = (f"the newest intact checkpoint is '{intact}': resume from it with --resume {intact}" if intact
            else "no intact checkpoint is left")
    raise TrlVideoError(f"latest checkpoint '{latest}' is damaged ({problem}); {hint} (nothing was changed)")


def check_tensors(path: str | Path, saved: dict[str, Any], expected: dict[str, Any], group: str) -> None:
    """Every expected tensor is saved with the same shape and dtype, and nothing else is saved."""
    for name, want in expected.items():
        got = saved.get(name)
        if got is None:
            raise TrlVideoError(f"checkpoint '{path}' lacks {group} tensor '{name}' (trained with another LoRA/full "
                                f"fine-tuning setting?)")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise TrlVideoError(f"checkpoint '{path}': {group} tensor '{name}' is {tuple(got.shape)} {got.dtype}, the "
                                f"model has {tuple(want.shape)} {want.dtype}")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise TrlVideoError(f"checkpoint '{path}' has {group} tensor '{extra[0]}' that the model does not have")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def compare_recipes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """(safe changes {key: (old, new)}, unsafe changed keys) between two (redacted) config dicts."""
    a, b = _flat(json.loads(json.dumps(saved, default=str))), _flat(json.loads(json.dumps(current, default=str)))
    safe: dict[str, tuple[Any, Any]] = {}
    unsafe: list[str] = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        if key.split(".")[0] in SAFE_RESUME_KEYS:
            safe[key] = (a.get(key), b.get(key))
        else:
            unsafe.append(key)
    return safe, unsafe


def unacceptable_changes(unsafe: list[str]) -> list[str]:
    """The unsafe changed keys that no flag can make a resumed run honour (seed, model, LoRA layout, batch
    shape, components, ...): the checkpoint's random state, tensors or component states fix them."""
    return [k for k in unsafe if k not in ACCEPTABLE_RESUME_KEYS and k.split(".")[0] not in ACCEPTABLE_RESUME_KEYS]


def data_fingerprint(prompts: list[str] | None) -> dict[str, Any]:
    """What the prompt order depends on besides the seed: the list itself."""
    if prompts is None:
        return {}
    h = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()
    return {"num_prompts": len(prompts), "prompts_sha256": h}


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (atomically); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if isinstance(row_step, int) and row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return dropped
