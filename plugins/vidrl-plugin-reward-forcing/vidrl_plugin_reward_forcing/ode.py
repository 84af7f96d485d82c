"""Stage 1 data: the bidirectional teacher's ODE trajectories as an HF dataset (built once), and its reader.

Each row: ``prompt``, ``seed`` (of the initial noise), ``states`` ``[K, C, F, H, W]`` = the teacher's ODE state
at the student's K denoising levels ``t_0 = 1 > ... > t_{K-1}``, and ``x0`` ``[C, F, H, W]`` = the ODE's end.
The teacher runs ``teacher_steps`` Euler steps on the schedule's shifted grid; ``teacher_steps`` is a multiple
of K, so the student's levels (the shifted K-step grid) are points of the teacher's grid and the states are exact
ODE states, not interpolations (CausVid Sec. 3.2 / Self-Forcing's ODE initialisation).
``ode_meta.json`` next to the dataset records the teacher, the levels and the latent shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import RewardForcingError
from .rollout import student_timesteps

META = "ode_meta.json"


def build_ode_dataset(teacher: Any, prompts: list[str], seeds: list[int], out: str | Path, *, num_steps: int = 4,
                      teacher_steps: int = 20, guidance_scale: float = 1.0, batch_size: int = 16,
                      teacher_name: str = "") -> Path:
    """Run the teacher's ODE from one noise per seed, keep the states at the student's K levels, save."""
    import datasets
    from trl_video.sampling import ode_sample, sample_batched

    if teacher_steps % num_steps:
        raise RewardForcingError(f"--teacher-steps ({teacher_steps}) must be a multiple of --num-steps ({num_steps})")
    stride = teacher_steps // num_steps
    c, f, h, w = teacher.latent_shape
    grid = teacher.schedule.timesteps(teacher_steps)
    kept: list[Tensor] = []

    def solve(x: Tensor, emb: Tensor, _seeds: list[int]) -> Tensor:
        states: list[Tensor] = [x.detach().float().cpu()]  # t_0 = 1: the noise itself

        def keep(i: int, x_next: Tensor) -> None:  # x_next is the state at grid[i + 1]
            if (i + 1) % stride == 0 and (i + 1) // stride < num_steps:
                states.append(x_next.detach().float().cpu())

        out = ode_sample(teacher, x, emb, grid, guidance_scale=guidance_scale, on_step=keep)
        kept.append(torch.stack(states, 1))
        return out

    x0 = sample_batched(teacher, prompts, seeds, solve, batch_size).float().cpu()
    states = torch.cat(kept)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "seed": datasets.Value("int64"),
        "states": datasets.Array5D(shape=(num_steps, c, f, h, w), dtype="float32"),
        "x0": datasets.Array4D(shape=(c, f, h, w), dtype="float32"),
    })
    ds = datasets.Dataset.from_dict({"prompt": prompts, "seed": seeds, "states": states.numpy(), "x0": x0.numpy()},
                                    features=features)
    out = Path(out)
    ds.save_to_disk(str(out))
    meta = {"teacher": teacher_name, "num_trajectories": len(prompts), "timesteps": student_timesteps(teacher.schedule, num_steps),
            "teacher_grid_points": [float(grid[k * stride]) for k in range(num_steps)], "teacher_steps": teacher_steps,
            "guidance_scale": guidance_scale, "latent_shape": [c, f, h, w]}
    (out / META).write_text(json.dumps(meta, indent=2))
    return out


class ODETrajectories:
    """Seeded, resumable reader of an ODE-trajectory dataset: an endless stream of shuffled epochs."""

    def __init__(self, path: str | Path, latent_shape: tuple[int, ...], seed: int = 0):
        import datasets

        path = Path(path)
        if not (path / META).exists():
            raise RewardForcingError(f"method_args.ode_dataset: '{path}' is not an ODE-trajectory dataset (no {META}); "
                                     f"build it with `trl-video bench reward_forcing.build-ode --out {path}`")
        self.meta = json.loads((path / META).read_text())
        if tuple(self.meta["latent_shape"]) != tuple(latent_shape):
            raise RewardForcingError(f"method_args.ode_dataset: '{path}' holds latents of shape "
                                     f"{self.meta['latent_shape']}, the model makes {list(latent_shape)}")
        self.ds = datasets.load_from_disk(str(path)).with_format("torch")
        self.timesteps: list[float] = [float(t) for t in self.meta["timesteps"]]
        self.seed, self.epoch, self.pos = seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        return torch.randperm(len(self.ds), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.ds)

    def next_batch(self, n: int) -> dict[str, Any]:
        idx = []
        while len(idx) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            take = self._order[self.pos:self.pos + n - len(idx)]
            idx += take
            self.pos += len(take)
        return self.ds[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()
