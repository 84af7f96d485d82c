"""``trl-video plan`` (trl_video/memory_plan.py): parameter counts of the shipped real configs, the tiny presets
counted like the real loaded models, FSDP division, the verdict line, and the planned peak of a real CPU training
step within 1.5x of the measured one."""

from __future__ import annotations

import pytest
import torch

from trl_video.config import VideoRewardConfig
from trl_video.memory_plan import GIB, build_transformer, find_spec, numel, plan_memory


@pytest.mark.parametrize("name,low,high", [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 1.3e9, 1.5e9),
                                           ("wan2.1-t2v-14b", 13.5e9, 14.5e9),
                                           ("THUDM/CogVideoX-2b", 1.6e9, 1.8e9),
                                           ("cogvideox-5b", 5.2e9, 5.7e9)])
def test_shipped_configs_have_the_published_sizes(name, low, high):
    with torch.device("meta"):
        n = numel(build_transformer(find_spec(name)))
    assert low <= n <= high, n  # "1.3B" / "14B" / "2B" / "5B" transformers


def _cfg(**kw):
    base = dict(model="tiny-wan", method="refl", reward="alignment", prompts_per_step=2, group_size=1,
                sampler_args={"num_steps": 4, "grad_steps": 1}, report_to="none")
    return VideoRewardConfig(**{**base, **kw})


def test_tiny_plan_counts_the_real_model_and_divides_by_fsdp_ranks():
    from trl_video.models.policy import load_policy

    cfg = _cfg(use_peft=True, lora_r=4)
    plan = plan_memory(cfg, gpus=1, gpu_mem_gib=1.0, measure=False)
    rows = {r.name: r.bytes for r in plan.rows}
    real = load_policy("tiny-wan")
    real.add_adapter(cfg.peft_config())
    n_tr = sum(p.numel() for p in real.transformer.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in real.transformer.parameters())
    assert rows["transformer trainable (fp32)"] == 4 * n_tr
    assert rows["transformer frozen weights"] == 4 * (n_all - n_tr)
    assert rows["AdamW moments (fp32)"] == 8 * n_tr
    assert rows["VAE weights"] == 4 * sum(p.numel() for p in real.vae.parameters())
    sharded = {r.name: r.bytes for r in plan_memory(cfg, gpus=2, fsdp=True, measure=False).rows}
    assert sharded["transformer frozen weights"] == rows["transformer frozen weights"] / 2
    assert "FSDP gathered blocks" in sharded and "FSDP gathered blocks" not in rows


def test_verdict_line_and_cli(capsys):
    from trl_video.cli import main

    assert main(["plan", "--recipe", "recipes/quickstart.yaml", "--gpus", "1", "--gpu-mem", "1", "--reserve", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("fits: ")
    assert main(["plan", "--recipe", "recipes/quickstart.yaml", "--gpu-mem", "0.05", "--reserve", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("does not fit: ")
    assert main(["plan", "--recipe", "recipes/quickstart.yaml", "--gpus", "3"]) == 2
    assert "not divisible by --gpus 3" in capsys.readouterr().err


def test_planned_peak_within_1_5x_of_a_measured_cpu_step(tmp_path):
    from trl_video.bench import measured_step_peak
    from trl_video.trainer import VideoRewardTrainer

    cfg = _cfg(use_peft=False, ema_decay=0.9, output_dir=str(tmp_path))
    planned = plan_memory(cfg, gpus=1, gpu_mem_gib=1.0).total
    trainer = VideoRewardTrainer(cfg)
    trainer.training_step()
    trainer.global_step += 1
    measured = measured_step_peak(trainer)["Total"]
    assert measured > 1e6
    assert 1 / 1.5 <= planned / measured <= 1.5, (planned / GIB, measured / GIB)


def test_launcher_configs_load_with_accelerate():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    folder = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
    seen = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = ClusterConfig.from_yaml_file(str(path))
        seen[path.name] = (str(cfg.distributed_type), cfg.num_machines, cfg.num_processes)
        if "fsdp" in path.name:
            assert cfg.fsdp_config["fsdp_version"] == 2
    assert seen == {"ddp_1node_8gpu.yaml": ("DistributedType.MULTI_GPU", 1, 8),
                    "ddp_2node_16gpu.yaml": ("DistributedType.MULTI_GPU", 2, 16),
                    "fsdp_1node_8gpu.yaml": ("DistributedType.FSDP", 1, 8),
                    "fsdp_2node_16gpu.yaml": ("DistributedType.FSDP", 2, 16)}


def test_accelerate_fsdp_launch_turns_sharding_on(monkeypatch):
    from types import SimpleNamespace

    from trl_video.sharding import fsdp_options, fsdp_requested

    cfg = SimpleNamespace(fsdp=False, fsdp_config={})
    assert not fsdp_requested(cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with distributed_type FSDP sets
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_requested(cfg)
    assert fsdp_options(cfg)["reshard_after_forward"] is False
