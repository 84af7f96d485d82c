"""``trl-video bench reward_forcing.stream``: a video longer than the training length, chunk by chunk, timed against
the whole clip generated bidirectionally in the same run."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import pytest
import torch

from trl_video.bench_discovery import import_benchmark


def test_stream_writes_a_longer_video_and_times_both_sides(tmp_path):
    torch.set_num_threads(1)
    commands = import_benchmark("reward_forcing", "commands")
    gif, out = tmp_path / "s.gif", tmp_path / "s.json"
    assert commands.cmd_stream(["--model", "tiny-wan", "--chunk-size", "1", "--teacher", "tiny-wan",
                                "--length", "2", "--num-steps", "2", "--teacher-steps", "2", "--reps", "2",
                                "--out", str(gif), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # tiny-wan: 5 latent frames per training clip; twice that streamed, Wan's VAE: 1 + 2 * (10 - 1) pixel frames
    assert (res["latent_frames"], res["chunks"], res["pixel_frames"]) == (10, 10, 19)
    assert len(imageio.mimread(gif)) == 19
    for side in ("stream", "bidirectional_2"):
        t = res[side]["time_to_first_chunk_s"]
        assert len(t["values"]) == 2 and 0 < t["min"] <= t["median"] <= t["max"]
    # the whole clip's first chunk exists only at its end: its time to first chunk is its total time
    assert res["bidirectional_2"]["chunks_per_s"]["values"] == pytest.approx(
        [10 / x for x in res["bidirectional_2"]["time_to_first_chunk_s"]["values"]], rel=2e-3)
