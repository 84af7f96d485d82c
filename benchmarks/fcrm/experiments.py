"""FCRM experiments on CPU (the plugin README's "measured results").

    trl-video bench fcrm.build-offline [N] [MODEL]  # world clips -> latents (+ reward)
    trl-video bench fcrm.lightness [STEPS|-] [MODEL|-] [key=value ...] [out=DIR]
                                                   # luminance, fully offline (paper Fig. 3)
    trl-video bench fcrm.settings --settings ...   # behaviour settings side by side

Every run writes ``out/fcrm/<...>/eval/eval_results.json`` (reward before = base with LoRA disabled,
after = trained, same held-out prompts and seeds) and ``fcrm_result.json`` (plus rollouts / wall-clock).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .bench import OFFLINE_PREFIX, bench_fcrm, build_world_offline, load_recipe, recipes_dir, run_recipe

#: the lightness experiment passes if mean luminance rises and prompt alignment drops by less than this
ALIGNMENT_TOLERANCE = 0.05


def build_offline(n: int = 256, model: str = "tiny-cogvideox") -> None:
    for reward in ("luminance", "alignment"):
        info = build_world_offline(f"{OFFLINE_PREFIX}{reward}", n=n, reward=reward, model=model)
        print(json.dumps(info))


def lightness(steps: int | None = None, out: str = "out/fcrm/lightness", model: str | None = None,
              sets: list[str] | None = None) -> dict:
    from trl_video.cli import apply_overrides

    rec = apply_overrides(load_recipe(recipes_dir() / "fcrm_offline.yaml"), sets or [])
    if steps:
        rec["max_steps"] = steps
    if model:  # another base model needs its own offline latents (its VAE)
        rec["model"] = model
        rec["offline_latents"] = f"{OFFLINE_PREFIX}{Path(model).name}_luminance"
    res = run_recipe(rec, out)
    luma, align = res["per_reward"]["luminance"], res["per_reward"]["alignment"]
    res["lightness"] = {
        "luminance_before": luma["before"], "luminance_after": luma["after"], "luminance_gain": luma["gain"],
        "luminance_gain_sem": luma["gain_sem"], "alignment_before": align["before"], "alignment_after": align["after"],
        "alignment_change": align["gain"], "alignment_tolerance": ALIGNMENT_TOLERANCE,
        "passed": bool(luma["gain"] > 2 * luma["gain_sem"] and align["gain"] > -ALIGNMENT_TOLERANCE),
    }
    Path(out, "fcrm_result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["lightness"], indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    cmd = argv.pop(0) if argv else "help"
    if cmd == "build-offline":
        build_offline(int(argv[0]) if argv else 256, argv[1] if len(argv) > 1 else "tiny-cogvideox")
    elif cmd == "lightness":
        out = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("out=")), "out/fcrm/lightness")
        lightness(int(argv[0]) if argv and argv[0] != "-" else None, out=out,
                  model=argv[1] if len(argv) > 1 and argv[1] != "-" else None,
                  sets=[a for a in argv[2:] if not a.startswith("out=")])
    elif cmd == "settings":
        return bench_fcrm(["--settings", ",".join(argv)] if argv else [])
    else:
        print(__doc__)
        return 0 if cmd == "help" else 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
