"""Experiments live in the repository's benchmarks/ tree, not in the installed packages: discovered from a
checkout as ``trl-video bench <method>.<name>`` (former names kept as aliases), imported only when run, a broken
folder reported without stopping the rest, and a wheel install (no benchmarks/) says where they are."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from trl_video import bench_discovery
from trl_video.errors import PluginError
from trl_video.plugins import Registry, make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def registry() -> Registry:
    return Registry(*make_plugin_manager(load_entrypoints=False), benchmark_dirs=True)


def test_no_experiment_drivers_in_the_installable_packages() -> None:
    for pattern in ("plugins/*/vidrl_plugin_*/experiments.py", "plugins/*/vidrl_plugin_*/toy.py",
                    "plugins/*/vidrl_plugin_*/bench.py", "plugins/*/vidrl_plugin_*/commands.py", "trl_video/pretrain.py", "plugins/*/results",
                    "plugins/*/run_experiments.sh"):
        assert not glob.glob(str(ROOT / pattern)), pattern


def test_checkout_benchmarks_are_namespaced_with_the_former_names_as_aliases() -> None:
    reg = registry()
    names = set(reg.names("bench"))
    assert {"assets.pretrain", "velr.compare", "velr.pretrain", "velr.memory", "fcrm.settings", "fcrm.lightness",
            "dmalign.experiments", "overhead", "reward_forcing.build-ode", "reward_forcing.stream"} <= names
    assert reg.get("bench", "reward_forcing.build-ode").distribution == "benchmarks/reward_forcing"
    assert reg.get("bench", "velr-compare").name == "velr.compare"  # as the READMEs and recipes used to say
    assert reg.get("bench", "fcrm").name == "fcrm.settings"
    assert reg.get("bench", "dmalign").name == "dmalign.experiments"
    assert reg.get("bench", "memory").name == "velr.memory"  # bare name, unambiguous
    assert reg.get("bench", "velr.compare").distribution == "benchmarks/velr"
    assert not any(k.startswith("benchmarks/") for k in reg.broken), reg.broken


def test_a_benchmark_module_is_imported_only_when_it_runs() -> None:
    import sys

    reg = registry()
    sys.modules.pop("trl_video_benchmarks.fcrm.bench", None)
    fn = reg.get("bench", "fcrm.settings").obj
    assert "trl_video_benchmarks.fcrm.bench" not in sys.modules
    with pytest.raises(SystemExit) as exc:
        fn(["--help"])
    assert exc.value.code == 0 and "trl_video_benchmarks.fcrm.bench" in sys.modules


def test_a_broken_benchmark_folder_is_reported_and_the_rest_still_works(tmp_path, monkeypatch) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "bench.py").write_text("def main(argv):\n    return 7\n\nBENCHMARKS = {'run': main}\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bench.py").write_text("def main(argv):\n    return 0\n")  # no BENCHMARKS
    monkeypatch.setenv(bench_discovery.BENCHMARKS_ENV, str(tmp_path))
    reg = registry()
    assert "no BENCHMARKS" in reg.broken["benchmarks/bad"]
    assert reg.get("bench", "good.run").obj([]) == 7
    assert reg.get("bench", "overhead").plugin == "builtin"


def test_a_wheel_install_says_where_the_benchmarks_are(monkeypatch, capsys) -> None:
    import argparse

    from trl_video.cli import cmd_bench

    monkeypatch.setattr(bench_discovery, "benchmarks_root", lambda: None)
    reg = registry()
    assert "overhead" in reg.names("bench") and all(i.plugin == "builtin" for i in reg.items("bench"))
    with pytest.raises(PluginError, match="benchmarks/ folder: run them from a checkout"):
        reg.get("bench", "velr.compare")
    monkeypatch.setattr("trl_video.plugins._DEFAULT", reg)
    assert cmd_bench(argparse.Namespace(name=None), []) == 0
    out = capsys.readouterr().out
    assert "overhead" in out and "run them from a checkout" in out and bench_discovery.BENCHMARKS_ENV in out


def test_a_benchmark_declares_what_it_builds_and_a_dry_run_names_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "bench.py").write_text("def main(argv):\n    return 0\n\nBENCHMARKS = {'run': main}\n"
                                             "BUILDS = {'out/m/data': 'trl-video bench m.run --big'}\n")
    monkeypatch.setenv(bench_discovery.BENCHMARKS_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert bench_discovery.build_command("out/m/data") == "trl-video bench m.run --big"
    assert bench_discovery.build_command(str(tmp_path / "out/m/data")) == "trl-video bench m.run --big"
    assert bench_discovery.build_command("out/m/other") is None
    assert bench_discovery.missing_path_hint("out/m/data") == "; build it with: trl-video bench m.run --big"
    (tmp_path / "m" / "bench.py").write_text("BENCHMARKS = {}\nBUILDS = {'out/m/data': 3}\n")
    with pytest.raises(ValueError, match="BUILDS entries"):
        bench_discovery.declared_builds(tmp_path / "m" / "bench.py")
    assert bench_discovery.build_command("out/m/data") is None  # an unreadable table is skipped, not fatal


def test_interleaved_timings_alternate_the_order_after_the_warmup() -> None:
    from trl_video.bench import interleaved_timings, quartiles

    calls: list[str] = []

    def side(name: str, seconds: float):
        def run() -> float:
            calls.append(name)
            return seconds
        return run

    times = interleaved_timings({"a": side("a", 1.0), "b": side("b", 2.0)}, steps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in alternating order
    assert times == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}  # warm-up runs are not timed
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.5, 4.5)


def test_scaling_breakdown_separates_communication_waiting_and_contention() -> None:
    """Synthetic 2-rank run: per step each rank computes, the first to finish waits in the all-reduce for the other,
    then both spend the communication time c and the metric gather m."""
    from trl_video.bench import scaling_breakdown

    c, m = 0.005, 0.001
    compute = [(0.90, 0.95), (1.00, 0.92), (0.93, 0.93)]  # per step: rank 0, rank 1
    ranks = [{"step_s": [], "parts": []} for _ in range(2)]
    for step in compute:
        for r, own in enumerate(step):
            sync = c + max(step) - own  # waits for the slower rank, then communicates
            ranks[r]["step_s"].append(own + sync + m)
            ranks[r]["parts"].append({"grad_sync": sync, "metrics": m})
    w = scaling_breakdown([ranks], one_s=1.6, half_s=0.9)
    assert w["ideal_s"] == pytest.approx(0.8) and w["fixed_cost_s"] == pytest.approx(0.1)
    assert w["distributed_s"] == pytest.approx(0.95 + c + m - 0.9)  # median step 0.956 vs one rank alone
    assert w["grad_sync_s"] == pytest.approx(c) and w["metrics_s"] == pytest.approx(m)
    assert w["wait_in_sync_s"] == pytest.approx(0.05) and w["wait_mean_s"] == pytest.approx((0.05 + 0.08) / 3)
    assert w["faster_rank_compute_s"] == pytest.approx(0.92) and w["slower_rank_compute_s"] == pytest.approx(0.95)
    assert w["contention_s"] == pytest.approx(0.02)


def test_scaling_video_size_reaches_the_worker_config() -> None:
    """``bench scaling --frames F --size S`` trains on F x S x S videos; without them the model's own size."""
    import argparse

    from trl_video.bench import _scaling_config

    base = {"model": "tiny-wan", "num_steps": 8, "grad_steps": 2}
    cfg = _scaling_config(argparse.Namespace(**base, frames=17, size=96), batch=4, out="unused")
    assert (cfg.num_frames, cfg.height, cfg.width, cfg.prompts_per_step) == (17, 96, 96, 4)
    cfg = _scaling_config(argparse.Namespace(**base, frames=None, size=None), batch=8, out="unused")
    assert (cfg.num_frames, cfg.height, cfg.width) == (None, None, None)


def test_scaling_bad_video_size_is_one_error_line_before_any_worker(capsys) -> None:
    from trl_video.cli import main

    assert main(["bench", "scaling", "--frames", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: num_frames 16 cannot be taken by model 'tiny-wan': the VAE needs 2k+1 frames (e.g. 15)"]
