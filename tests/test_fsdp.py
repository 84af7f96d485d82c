"""Acceptance of FSDP2 sharding (``fsdp: true``) on 2 CPU processes (gloo) against unsharded runs.

Two launches run side by side (tests/fsdp_worker.py): ``torchrun --nproc_per_node 2`` (``ACCELERATE_USE_CPU=true``:
accelerate owns the gloo process group; the trainer applies ``fully_shard``) with ReFL-LoRA (+ resume), DM-Align
full fine-tuning (generator, reference copy and fake score sharded), FCRM sharded and FCRM unsharded (one group
of 2 samples split over the ranks); and one plain process with ReFL and DM-Align at the same global batch
(2 prompts: one sample per rank).

Tolerances (float32; the sharded and unsharded runs sum the same per-sample gradients in a different order):
* gradients the optimiser sees: |g_fsdp - g_1proc| <= 5e-4 * max|g_1proc| per step (measured <= 9e-5 for ReFL,
  whose gradient runs through 2 sampling steps and the VAE decoder, <= 1e-6 for DM-Align). A sum instead of a
  mean over ranks (2x) or a missing reduction would fail it.
* weights after k steps: |w_fsdp - w_1proc| <= 5e-4 (5% of one Adam step at lr 1e-2; Adam divides by |g|, which
  amplifies the rounding on near-zero gradient entries: measured 6e-5 for ReFL, 3e-7 for DM-Align).
* FCRM against the same 2 processes unsharded, and a resumed run against the uninterrupted one: exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_distributed import flaky_abort, free_port  # noqa: E402

pytestmark = pytest.mark.distributed

GRAD_RTOL = 5e-4
WEIGHT_ATOL = 5e-4


def _env() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    worker = str(HERE / "fsdp_worker.py")
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"fsdp{attempt}")
        sharded = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             worker, str(out / "two"), "refl,dmd,fcrm,fcrm-ddp"],
            env=dict(_env(), ACCELERATE_USE_CPU="true"), cwd=HERE.parent, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        single = subprocess.run([sys.executable, worker, str(out / "one"), "refl,dmd"], env=_env(), cwd=HERE.parent,
                                capture_output=True, text=True, timeout=1200)
        stdout, stderr = sharded.communicate(timeout=1200)
        proc = subprocess.CompletedProcess(sharded.args, sharded.returncode, stdout, stderr)
        if proc.returncode == 0 or not flaky_abort(proc) or attempt == 1:
            break
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    assert single.returncode == 0, f"single process failed:\n{single.stderr[-6000:]}"
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _ranks(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("scenario", ["refl", "dmd", "fcrm"])
def test_each_rank_holds_half_of_the_sharded_parameters(runs, scenario):
    r0, r1 = _ranks(runs / "two" / scenario)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert "FSDP2 over mesh (2,)" in r0["sharding"]
    sharded = {"refl": ["policy"], "dmd": ["policy", "reference", "fake"], "fcrm": ["policy"]}[scenario]
    for name in sharded:
        a, b = r0["held"][name], r1["held"][name]
        assert a["local"] + b["local"] == a["full"], name  # every element lives on exactly one rank
        assert 0.45 <= a["local"] / a["full"] <= 0.55, (name, a)
    if scenario == "fcrm":  # the small auxiliary b_phi is replicated (all-reduced by the trainer)
        assert "replicated: b_phi" in r0["sharding"]
        assert r0["held"]["b_phi"]["local"] == r0["held"]["b_phi"]["full"] > 0


@pytest.mark.parametrize("scenario", ["refl", "dmd"])
def test_sharded_run_equals_one_process_run(runs, scenario):
    two, one = runs / "two" / scenario, runs / "one" / scenario
    g2, g1 = _load(two / "grads.safetensors"), _load(one / "grads.safetensors")
    assert sorted(g2) == sorted(g1) and len(g1) >= 2  # every optimiser step of every group
    for k in g1:
        scale = float(g1[k].abs().max())
        assert float((g2[k] - g1[k]).abs().max()) <= GRAD_RTOL * scale + 1e-9, k
    assert any(float(g.abs().max()) > 0 for g in g1.values())
    step = 2
    w2 = _load(two / f"checkpoint-{step}" / "trainable.safetensors")
    w1 = _load(one / f"checkpoint-{step}" / "trainable.safetensors")
    assert sorted(w2) == sorted(w1)  # the sharded checkpoint has the unsharded format: full tensors, same names
    for k in w1:
        assert w2[k].shape == w1[k].shape and w2[k].dtype == w1[k].dtype, k
        torch.testing.assert_close(w2[k], w1[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    o2 = torch.load(two / f"checkpoint-{step}" / "optimizers.pt", weights_only=True)
    o1 = torch.load(one / f"checkpoint-{step}" / "optimizers.pt", weights_only=True)
    for name in o1:  # torch's own optimiser layout, parameters numbered alike
        assert o2[name]["optimizer"]["param_groups"] == o1[name]["optimizer"]["param_groups"]
        s2, s1 = o2[name]["optimizer"]["state"], o1[name]["optimizer"]["state"]
        assert sorted(s2) == sorted(s1) and s1
        for i in s1:
            assert s2[i]["exp_avg"].shape == s1[i]["exp_avg"].shape
            assert torch.equal(s2[i]["step"], s1[i]["step"])


def test_fcrm_sharded_equals_unsharded_on_the_same_processes(runs):
    fs, dp = runs / "two" / "fcrm", runs / "two" / "fcrm-ddp"
    g_fs, g_dp = _load(fs / "grads.safetensors"), _load(dp / "grads.safetensors")
    assert sorted(g_fs) == sorted(g_dp) == ["b_phi/0", "b_phi/1", "policy/0", "policy/1"]
    for k in g_dp:
        torch.testing.assert_close(g_fs[k], g_dp[k], atol=1e-7, rtol=1e-6, msg=k)
    w_fs, w_dp = _load(fs / "checkpoint-2" / "trainable.safetensors"), _load(dp / "checkpoint-2" / "trainable.safetensors")
    assert sorted(w_fs) == sorted(w_dp)
    for k in w_dp:
        torch.testing.assert_close(w_fs[k], w_dp[k], atol=1e-6, rtol=1e-6, msg=k)


def test_lora_export_is_non_empty_and_equals_the_unsharded_export(runs):
    two, one = runs / "two" / "refl" / "model", runs / "one" / "refl" / "model"
    l2, l1 = _load(two / "pytorch_lora_weights.safetensors"), _load(one / "pytorch_lora_weights.safetensors")
    assert len(l2) == len(l1) == 4 * 4 * 4  # 4 blocks x 4 target modules (q, k, v, out) x lora_A/B
    assert sorted(l2) == sorted(l1)
    assert all(v.numel() > 0 for v in l2.values())
    assert any(float(v.abs().max()) > 0 for k, v in l2.items() if "lora_B" in k)  # trained, not the zero init
    for k in l1:
        torch.testing.assert_close(l2[k], l1[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    # exactly the weights of the sharded run's own final checkpoint (gathered, not re-initialised)
    ck = _load(runs / "two" / "refl" / "checkpoint-2" / "trainable.safetensors")
    for k, v in l2.items():
        name = "policy/" + k.removeprefix("transformer.").replace(".weight", ".default.weight")
        assert torch.equal(v, ck[name]), k
    # the same diffusers folder: same files, same merged transformer weights
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file() and p.name != "README.md")
    assert files == sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file() and p.name != "README.md")
    t2 = _load(two / "transformer" / "diffusion_pytorch_model.safetensors")
    t1 = _load(one / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sorted(t2) == sorted(t1) and not any("lora" in k for k in t2)
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    assert json.loads((two / "transformer" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"


def test_full_finetune_export_of_sharded_generator(runs):
    two, one = runs / "two" / "dmd" / "model", runs / "one" / "dmd" / "model"
    assert not (two / "pytorch_lora_weights.safetensors").exists()
    t2 = _load(two / "transformer" / "diffusion_pytorch_model.safetensors")
    t1 = _load(one / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sorted(t2) == sorted(t1)
    ck = _load(runs / "two" / "dmd" / "checkpoint-2" / "trainable.safetensors")
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
        assert torch.equal(t2[k], ck[f"policy/{k}"]), k


def test_resume_from_a_sharded_checkpoint_reproduces_the_run(runs):
    full, resumed = runs / "two" / "refl", runs / "two" / "refl-resumed"
    a, b = _load(full / "checkpoint-2" / "trainable.safetensors"), _load(resumed / "checkpoint-2" / "trainable.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = torch.load(full / "checkpoint-2" / "ema.pt", weights_only=True)["policy"]
    eb = torch.load(resumed / "checkpoint-2" / "ema.pt", weights_only=True)["policy"]
    assert ea["optimization_step"] == eb["optimization_step"] == 2
    for x, y in zip(ea["shadow_params"], eb["shadow_params"], strict=True):
        assert torch.equal(x, y)
    oa = torch.load(full / "checkpoint-2" / "optimizers.pt", weights_only=True)["policy"]["optimizer"]["state"]
    ob = torch.load(resumed / "checkpoint-2" / "optimizers.pt", weights_only=True)["policy"]["optimizer"]["state"]
    for i in oa:
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])
    la = _load(full / "model" / "pytorch_lora_weights.safetensors")
    lb = _load(resumed / "model" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_full_state_helpers_keep_torch_layout_without_sharding():
    """Unsharded modules go through the same helpers: torch's own optimiser layout, round trip exact."""
    from trl_video.sharding import load_optimizer_state_dict, optimizer_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    ours, theirs = optimizer_state_dict(net, opt), opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for i, s in theirs["state"].items():
        assert all(torch.equal(ours["state"][i][k], v) for k, v in s.items())
    fresh = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    load_optimizer_state_dict(net, fresh, ours)
    for i, s in fresh.state_dict()["state"].items():
        assert all(torch.equal(theirs["state"][i][k], v) for k, v in s.items())


def test_fsdp_config_errors_name_the_key():
    from types import SimpleNamespace

    from trl_video.errors import TrlVideoError
    from trl_video.sharding import fsdp_options

    assert fsdp_options(SimpleNamespace(fsdp_config={})) == {"reshard_after_forward": True, "shard_size": 0}
    with pytest.raises(TrlVideoError, match="unknown key 'reshard'"):
        fsdp_options(SimpleNamespace(fsdp_config={"reshard": False}))
    with pytest.raises(TrlVideoError, match="'shard_size' must be int"):
        fsdp_options(SimpleNamespace(fsdp_config={"shard_size": "2"}))
