"""The LRM dataset builder and pre-training of benchmarks/velr."""

from __future__ import annotations

import json

import pytest

from trl_video.bench_discovery import import_benchmark


@pytest.fixture(scope="module")
def cog_policy():
    from trl_video.models.policy import load_policy

    return load_policy("tiny-cogvideox-random")


def test_build_dataset_and_pretrain(cog_policy, tmp_path):
    bench = import_benchmark("velr")
    build_dataset, pretrain = bench.build_dataset, bench.pretrain

    meta = build_dataset("tiny-cogvideox-random", str(tmp_path / "ds"), n_world=6, n_policy=2, num_steps=2,
                         policy=cog_policy, batch=8)
    assert set(meta["reward_mean"]) == {"world", "policy"}
    rep = pretrain(str(tmp_path / "ds"), str(tmp_path / "lrm"), members=3, epochs=2, lr=1e-3, batch=4,
                   widths=(8, 8, 16), heads=2, layers=1, policy=cog_policy, log_every=100)
    assert len(rep["heldout"]["members"]) == 3 and set(rep["heldout"]["ensembles"]) == {"1", "3"}
    assert rep["history"][-1]["train_huber"] < rep["history"][0]["train_huber"] * 5
    cfg = json.loads((tmp_path / "lrm" / "lrm_config.json").read_text())
    assert cfg["text_model"] == "tiny-cogvideox-random" and len(cfg["heldout_indices"]) == 2


