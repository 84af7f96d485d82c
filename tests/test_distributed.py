"""Acceptance: 2 CPU processes (gloo) under ``accelerate launch`` keep identical weights, all-reduce the
gradients to their mean, and normalise groups over the whole process group (see tests/ddp_worker.py).

``accelerate launch --multi_gpu`` only picks the CPU/gloo backend when ``ACCELERATE_USE_CPU`` is set
(the multi-GPU launcher does not set it, unlike ``--cpu``), so the test sets it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
EPS = 1e-4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(outdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "ddp_worker.py"), str(outdir)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=240)


def flaky_abort(proc: subprocess.CompletedProcess) -> bool:
    text = proc.stdout + proc.stderr
    return proc.returncode in (-6, 134) or any(s in text for s in ("SIGABRT", "Signal 6", "EADDRINUSE",
                                                                    "address already in use"))


def group_ref(rewards: np.ndarray, gids: np.ndarray, std: str = "group") -> np.ndarray:
    """Single-process reference: (r - mean_G) / (std_G + eps), population std."""
    out = np.empty_like(rewards, dtype=np.float64)
    for g in np.unique(gids):
        sel = gids == g
        r = rewards[sel].astype(np.float64)
        scale = r.std() if std == "group" else rewards.astype(np.float64).std()
        out[sel] = (r - r.mean()) / (scale + EPS)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from safetensors.torch import load_file

    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"ddp{attempt}")
        proc = launch(out)
        if proc.returncode == 0 or not flaky_abort(proc) or attempt == 1:
            break
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    tensors = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    return dict(out=out, ranks=ranks, tensors=tensors)


pytestmark = pytest.mark.distributed


def test_two_processes_ran(ddp_run):
    r0, r1 = ddp_run["ranks"]
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world"] == r1["world"] == 2
    assert r0["global_step"] == r1["global_step"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) == 2


def test_weights_identical_on_both_ranks(ddp_run):
    t0, t1 = ddp_run["tensors"]
    final = [k for k in t0 if k.startswith("final/")]
    assert final and set(final) == {k for k in t1 if k.startswith("final/")}
    for k in final:
        assert torch.equal(t0[k], t1[k]), k
    # both started from the same LoRA initialisation, and training moved it
    for k in (k for k in t0 if k.startswith("init/")):
        assert torch.equal(t0[k], t1[k]), k
    moved = [k for k in final if "lora_B" in k and not torch.equal(t0[k], t0["init/" + k[len("final/"):]])]
    assert moved


def test_gradients_all_reduced_to_the_mean(ddp_run):
    t0, t1 = ddp_run["tensors"]
    g0, g1 = t0["local_grad"], t1["local_grad"]
    assert g0.shape == g1.shape and g0.numel() > 0
    # the ranks saw different samples, so their local gradients differ ...
    assert not torch.allclose(g0, g1)
    assert g0.abs().sum() > 0 and g1.abs().sum() > 0
    # ... and after the all-reduce both hold exactly the same tensor: their mean
    assert torch.equal(t0["synced_grad"], t1["synced_grad"])
    torch.testing.assert_close(t0["synced_grad"], (g0 + g1) / 2, atol=1e-7, rtol=1e-5)


def test_trainer_prompt_layout_and_group_advantages(ddp_run):
    """prompts_per_step=2, group_size=2 on 2 ranks: the shared-seed prompt order gives both ranks the same
    prompt list; rank r takes the contiguous slice [2r, 2r + 2), i.e. one whole group each, with global ids."""
    r0, r1 = ddp_run["ranks"]
    rows = [json.loads(line) for line in (ddp_run["out"] / "run" / "metrics.jsonl").read_text().splitlines()]
    for step, (a, b) in enumerate(zip(r0["steps"], r1["steps"]), start=1):
        assert a["group_ids"] == [0, 0] and b["group_ids"] == [1, 1]
        assert len(set(a["prompts"])) == 1 and len(set(b["prompts"])) == 1 and a["prompts"][0] != b["prompts"][0]
        rewards = np.array(a["rewards"] + b["rewards"])
        gids = np.array(a["group_ids"] + b["group_ids"])
        ref = group_ref(rewards, gids)
        np.testing.assert_allclose(a["advantages"] + b["advantages"], ref, rtol=1e-4, atol=1e-5)
        # the logged reward mean is over all 4 samples of both ranks
        row = next(r for r in rows if r["step"] == step)
        assert abs(row["reward_mean"] - rewards.mean()) < 2e-6
        assert abs(row["reward_std"] - rewards.std()) < 2e-6


def test_group_spanning_ranks_in_the_trainer(ddp_run):
    """prompts_per_step=1, group_size=4: the one group is split 2 + 2 over the ranks and is normalised with
    the statistics of all 4 samples."""
    a, b = ddp_run["ranks"][0]["span_steps"][0], ddp_run["ranks"][1]["span_steps"][0]
    assert a["group_ids"] == b["group_ids"] == [0, 0]
    assert len(set(a["prompts"] + b["prompts"])) == 1
    rewards = np.array(a["rewards"] + b["rewards"])
    ref = group_ref(rewards, np.zeros(4, dtype=int))
    got = np.array(a["advantages"] + b["advantages"])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # a per-rank normalisation would be different (the gather matters)
    local = np.concatenate([group_ref(np.array(a["rewards"]), np.zeros(2, dtype=int)),
                            group_ref(np.array(b["rewards"]), np.zeros(2, dtype=int))])
    assert np.abs(local - got).max() > 1e-2
    assert abs(got.mean()) < 1e-5


def test_group_advantage_direct_equals_single_process(ddp_run):
    t0, t1 = ddp_run["tensors"]
    rewards = torch.cat([t0["direct/rewards"], t1["direct/rewards"]]).numpy()
    gids = torch.cat([t0["direct/group_ids"], t1["direct/group_ids"]]).numpy()
    assert set(gids[:4]) & set(gids[4:])  # groups span ranks
    got = torch.cat([t0["direct/adv"], t1["direct/adv"]]).numpy()
    np.testing.assert_allclose(got, group_ref(rewards, gids), rtol=1e-4, atol=1e-5)
    got_b = torch.cat([t0["direct/adv_batch"], t1["direct/adv_batch"]]).numpy()
    np.testing.assert_allclose(got_b, group_ref(rewards, gids, std="batch"), rtol=1e-4, atol=1e-5)
    # and it equals the library's own single-process computation over the concatenation
    from trl_video.components.estimators import group_advantages

    single = group_advantages(torch.from_numpy(rewards), torch.from_numpy(gids), "group", EPS).numpy()
    np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_every_rank(ddp_run):
    """The final checkpoint is complete: trainer state, weights equal to both ranks' weights, and one RNG
    file per rank; no temporary folder is left behind."""
    from safetensors.torch import load_file

    run = ddp_run["out"] / "run"
    ck = run / "checkpoint-2"
    assert (ck / "trainer_state.json").exists()
    assert sorted(p.name for p in ck.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    saved = load_file(str(ck / "trainable.safetensors"))
    t0 = ddp_run["tensors"][0]
    finals = {k[len("final/"):]: v for k, v in t0.items() if k.startswith("final/")}
    assert {k[len("policy/"):] for k in saved} == set(finals)
    for k, v in finals.items():
        assert torch.equal(saved[f"policy/{k}"], v)
    # the two ranks' sampling generators were saved in different states (per-rank seeds)
    g0 = torch.load(ck / "rng-0.pt", weights_only=True)["generator"]
    g1 = torch.load(ck / "rng-1.pt", weights_only=True)["generator"]
    assert not torch.equal(g0, g1)


def test_logged_metrics_are_means_over_ranks_and_micro_batches(ddp_run):
    """2 ranks x 2 micro-batches: the logged loss is the mean of all 4 values (not rank 0's last micro-batch),
    the reward statistics cover all 8 samples, and both ranks return the same figures."""
    r0, r1 = ddp_run["ranks"]
    losses = r0["acc_losses"] + r1["acc_losses"]
    assert len(r0["acc_losses"]) == len(r1["acc_losses"]) == 2
    assert len(set(losses)) == 4  # the four micro-batches differ, so the mean is a real test
    m0, m1 = r0["acc_metrics"], r1["acc_metrics"]
    assert m0["loss/policy"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert m0["loss/policy"] != pytest.approx(r0["acc_losses"][-1], rel=1e-6)
    rewards = np.array(r0["acc_rewards"] + r1["acc_rewards"])
    assert len(rewards) == 8
    assert m0["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-6)
    assert m0["reward_std"] == pytest.approx(rewards.std(), abs=1e-6)
    assert m0["samples_per_second"] == pytest.approx(8 / m0["seconds"])
    assert m0["peak_memory_mb"] > 50
    for k in ("loss/policy", "reward_mean", "grad_norm/policy", "seconds", "peak_memory_mb"):
        assert m0[k] == m1[k], k
