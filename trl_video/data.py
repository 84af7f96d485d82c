"""Prompts and offline latents as Hugging Face ``datasets``; ``encode_videos`` builds an offline-latents
dataset from real video files with the policy's VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrlVideoError
from .rollouts import Rollouts

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
VIDEO_EXTS = (".mp4", ".gif", ".webm", ".mov", ".avi")


def _trl_dataset(datasets: list[dict[str, Any]], streaming: bool = False, test_split_size: float | None = None):
    """Load through TRL's dataset mixture (``trl.DatasetMixtureConfig`` + ``trl.get_dataset``): the train split."""
    from trl import DatasetMixtureConfig, get_dataset

    mixture = DatasetMixtureConfig(datasets=[dict(d) for d in datasets], streaming=streaming,  # type: ignore[misc]
                                   test_split_size=test_split_size)
    return get_dataset(mixture)["train"]


def load_prompt_dataset(source: str | dict[str, Any], column: str = "prompt"):
    """Return a ``datasets.Dataset`` with a ``column`` of prompt strings.

    ``source``: ``world:<split>``; a json/jsonl/csv/parquet/txt file or a hub dataset id (both loaded through TRL's
    ``get_dataset``); a folder written by ``save_to_disk``; or a TRL ``DatasetMixtureConfig`` mapping
    (``{datasets: [{path, name, data_files, split, columns, fraction}, ...]}``, the recipe's ``prompt_datasets``).
    """
    import datasets

    if isinstance(source, dict):
        where = "prompt_datasets"
        try:
            ds = _trl_dataset(**source)
        except TypeError as exc:  # an unknown key of DatasetMixtureConfig / DatasetConfig
            raise TrlVideoError(f"prompt_datasets: {exc}") from exc
        except Exception as exc:
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise TrlVideoError(f"prompt_datasets: cannot load the mixture: {type(exc).__name__}: {msg}") from exc
        source = where
    elif source.startswith("world:"):
        from . import world

        return world.world_dataset(source.split(":", 1)[1])
    else:
        path = Path(source).expanduser()
        if path.suffix in FILE_BUILDERS:
            if not path.exists():
                raise TrlVideoError(f"prompts file not found: {path}")
            builder = FILE_BUILDERS[path.suffix]
            if path.is_file() and path.stat().st_size == 0:
                raise TrlVideoError(f"prompts file '{path}' is empty")
            try:
                ds = _trl_dataset([{"path": builder, "data_files": str(path)}])
            except TrlVideoError:
                raise
            except Exception as exc:  # the datasets builder's own error, named by the file (one line)
                cause = exc.__cause__ or exc
                raise TrlVideoError(f"prompts file '{path}' cannot be read as {builder}: {type(cause).__name__}: "
                                    f"{_first_line(cause)}") from exc
            if builder == "text" and column not in ds.column_names:
                ds = ds.rename_column("text", column)
        elif path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise TrlVideoError(f"prompts folder '{path}' is not a dataset saved with save_to_disk: {exc}") from exc
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            try:
                ds = _trl_dataset([{"path": source}])
            except Exception as exc:
                raise TrlVideoError(f"cannot load prompt dataset '{source}' from the hub: {type(exc).__name__}") from exc
        else:
            raise TrlVideoError(f"prompts '{source}': not found (expected world:<split>, a file, a folder or a hub id)")
    if column not in ds.column_names:
        raise TrlVideoError(f"prompts '{source}' has no column '{column}' (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise TrlVideoError(f"prompts '{source}' is empty")
    blank = [i for i, p in enumerate(ds[column]) if not isinstance(p, str) or not p.strip()]
    if blank:
        raise TrlVideoError(f"prompts '{source}': {len(blank)} row(s) have no prompt text in column '{column}' "
                            f"(rows {blank[:5]})")
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def load_prompts(source: str | dict[str, Any], column: str = "prompt") -> list[str]:
    return [str(p) for p in load_prompt_dataset(source, column)[column]]


class PromptSampler:
    """Shared-seed prompt order: every process draws the same prompts each step (so a group of G samples
    of one prompt can be spread over processes), reshuffled each epoch."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = prompts
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self, n: int) -> tuple[list[str], list[int]]:
        out: list[int] = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            out.append(self.order.pop())
        return [self.prompts[i] for i in out], out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])


# ------------------------------------------------------------------------------------------ offline latents
def offline_features(latent_shape: tuple[int, ...]):
    import datasets

    return datasets.Features({
        "prompt": datasets.Value("string"),
        "latents": datasets.Array4D(shape=tuple(latent_shape), dtype="float32"),
        "reward": datasets.Value("float32"),
        "source": datasets.Value("string"),
    })


class OfflineLatents:
    """A stream over an offline-latents dataset (``prompt``, ``latents`` [C,F,H,W], optional ``reward``,
    ``source``), shape- and dtype-checked against the policy. Shuffled with a shared seed; each process
    reads its own slice of every global batch."""

    def __init__(self, path: str, latent_shape: tuple[int, ...], seed: int = 0):
        import datasets

        p = Path(path).expanduser()
        if not p.exists():
            raise TrlVideoError(f"offline_latents: folder not found: {p}")
        if p.is_dir() and not any(p.iterdir()):
            raise TrlVideoError(f"offline_latents '{p}' is an empty folder (expected a dataset saved with "
                                f"save_to_disk, e.g. by `trl-video encode`)")
        state = p / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
            raise TrlVideoError(f"offline_latents '{p}' holds no rows")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:
            raise TrlVideoError(f"offline_latents: '{p}' is not a dataset saved with save_to_disk ({exc})") from exc
        if len(ds) == 0:
            raise TrlVideoError(f"offline_latents '{p}' holds no rows")
        for col in ("prompt", "latents"):
            if col not in ds.column_names:
                raise TrlVideoError(f"offline_latents '{p}' has no column '{col}' (columns: {', '.join(ds.column_names)})")
        first = np.asarray(ds[0]["latents"])
        if tuple(first.shape) != tuple(latent_shape):
            raise TrlVideoError(f"offline_latents '{p}': latents have shape {tuple(first.shape)} but the policy "
                                f"expects {tuple(latent_shape)}")
        if not np.issubdtype(first.dtype, np.floating):
            raise TrlVideoError(f"offline_latents '{p}': latents must be floating point, got {first.dtype}")
        self.path = str(p)
        self.ds = ds.with_format("torch")
        self.has_reward = "reward" in ds.column_names
        self.generator = torch.Generator().manual_seed(seed + 17)
        self.order: list[int] = []
        self.epoch = 0
        self.drawn = 0  # rows handed out (all processes) since this object was built

    def __len__(self) -> int:
        return len(self.ds)

    def _next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.ds), generator=self.generator).tolist()
                self.epoch += 1
            out.append(self.order.pop())
        self.drawn += n
        return out

    def next_batch(self, ctx: Any, n: int) -> Rollouts:
        world_n = n * ctx.num_processes
        idx = self._next_indices(world_n)
        rank = ctx.accelerator.process_index
        mine = idx[rank * n:(rank + 1) * n]
        rows = self.ds[mine]
        lat = rows["latents"].float().to(ctx.device)
        bad = (~torch.isfinite(lat).flatten(1).all(1)).nonzero().flatten().tolist()
        if bad:
            raise TrlVideoError(f"offline_latents '{self.path}': rows {[mine[i] for i in bad][:8]} hold NaN/inf "
                                f"latents")
        prompts = list(rows["prompt"])
        emb, _ = ctx.policy.encode_prompts(prompts)
        rewards = None
        if self.has_reward:
            rewards = rows["reward"].float().to(ctx.device)
        return Rollouts(latents=lat, prompts=prompts, prompt_embeds=emb, rewards=rewards, source="offline",
                        offline_index=torch.tensor(mine))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.epoch = list(state["order"]), int(state["epoch"])


def save_offline_latents(out: str, prompts: list[str], latents: torch.Tensor, rewards: torch.Tensor | None = None,
                         source: str = "offline") -> None:
    import datasets

    feats = offline_features(tuple(latents.shape[1:]))
    r = rewards.tolist() if rewards is not None else [float("nan")] * len(prompts)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "latents": latents.float().cpu().numpy(), "reward": r,
                                     "source": [source] * len(prompts)}, features=feats)
    ds.save_to_disk(out)


# ------------------------------------------------------------------------------------------ video files
def read_video(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Read a video file (imageio: ffmpeg for mp4/webm/mov, pillow for gif) -> ``[3, F, H, W]`` in [-1, 1];
    frames are sampled evenly over the clip and resized bilinearly."""
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, index=None)
    except Exception as exc:
        raise TrlVideoError(f"cannot read video '{path}': {type(exc).__name__}: {_reader_reason(exc)}") from exc
    arr = np.asarray(frames)
    if arr.ndim == 3:  # single frame / grayscale
        arr = arr[None] if arr.shape[-1] in (3, 4) else arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    arr = arr[..., :3].astype(np.float32) / 127.5 - 1
    idx = np.linspace(0, len(arr) - 1, num_frames).round().astype(int)
    x = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2)  # F,3,h,w
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.permute(1, 0, 2, 3).clamp(-1, 1)


def _reader_reason(exc: BaseException) -> str:
    """The reader's first line and, for ffmpeg, its last diagnostic line (never the version banner)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return ""
    detail = [ln for ln in lines[1:] if not ln.startswith(("===", "ffmpeg version", "built with", "configuration:",
                                                            "lib", "Input #", "Duration:", "Stream #"))]
    return lines[0][:200] + (f" ({detail[-1][:200]})" if detail else "")


def encode_videos(videos: str, policy: Any, out: str, batch_size: int = 4) -> int:
    """Encode every video in a folder to normalised latents; captions come from ``captions.json``
    ({file name: caption}) or a ``<stem>.txt`` beside each video, else the file stem."""
    folder = Path(videos)
    if not folder.is_dir():
        raise TrlVideoError(f"--videos: folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    if not files:
        raise TrlVideoError(f"--videos: no video files ({', '.join(VIDEO_EXTS)}) in {folder}")
    caps_file = folder / "captions.json"
    caps = json.loads(caps_file.read_text()) if caps_file.exists() else {}
    prompts, lats = [], []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        pix = torch.stack([read_video(f, policy.num_frames, policy.height, policy.width) for f in chunk])
        with torch.no_grad():
            lats.append(policy.encode_video(pix).cpu())
        for f in chunk:
            txt = f.with_suffix(".txt")
            prompts.append(caps.get(f.name) or (txt.read_text().strip() if txt.exists() else f.stem.replace("_", " ")))
    save_offline_latents(out, prompts, torch.cat(lats), source="real")
    return len(files)
