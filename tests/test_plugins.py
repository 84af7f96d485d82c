"""The pluggy registry: built-ins, duplicates, broken / misspelled / disabled plugins, dotted paths, hints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trl_video import hookimpl
from trl_video.errors import PluginError
from trl_video.plugins import DISABLE_ENV, HOOK_POINTS, Registry, make_plugin_manager


class _Reward:
    space = "pixel"
    differentiable = True

    def __call__(self, inputs: Any, prompts: list[str]) -> Any:
        return inputs.flatten(1).mean(1)


def reward_plugin(name: str, *rewards: str) -> types.SimpleNamespace:
    """A tiny in-test plugin (a namespace, like a module) registering the given reward names."""

    @hookimpl
    def trl_video_register_rewards(register: Callable[..., None]) -> None:
        for r in rewards:
            register(r, _Reward)

    return types.SimpleNamespace(__name__=name, trl_video_register_rewards=trl_video_register_rewards)


def build(*plugins: object) -> Registry:
    pm, broken = make_plugin_manager(load_entrypoints=False, extra_plugins=list(plugins))
    return Registry(pm, broken)


@pytest.fixture(autouse=True)
def _no_disabled_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)


def test_builtins_fill_every_hook_point() -> None:
    reg = build()
    assert reg.broken == {}
    for kind in HOOK_POINTS:
        items = reg.items(kind)
        assert items, f"no built-in {kind}"
        assert all(i.distribution == "trl-video" and i.plugin == "builtin" for i in items)
    assert {"window", "ode", "sde"} <= set(reg.names("sampler"))
    assert {"none", "group"} <= set(reg.names("estimator"))
    assert "refl" in reg.names("loss")
    assert {"alignment", "luminance", "motion"} <= set(reg.names("reward"))
    assert {"fresh", "fifo", "offline"} <= set(reg.names("replay"))
    spec = reg.method("refl")
    assert spec.name == "refl" and spec.defaults["loss"] == "refl"
    assert "@article" in spec.citation


def test_third_party_component_is_registered_with_its_plugin_name() -> None:
    reg = build(reward_plugin("sparkle_plugin", "sparkle"))
    info = reg.get("reward", "sparkle")
    assert info.obj is _Reward and info.plugin == "sparkle_plugin" and info.distribution == "sparkle_plugin"
    assert "luminance" in reg.names("reward")


def test_duplicate_name_is_a_broken_plugin_and_the_others_stay_usable() -> None:
    reg = build(reward_plugin("dup_alpha", "sparkle", "alpha_only"), reward_plugin("dup_beta", "sparkle", "beta_only"),
                reward_plugin("bystander", "glitter"))
    # both plugins are reported, each naming both distributions
    assert {"dup_alpha", "dup_beta"} <= set(reg.broken)
    for reason in (reg.broken["dup_alpha"], reg.broken["dup_beta"]):
        assert "duplicate reward 'sparkle'" in reason and "dup_alpha" in reason and "dup_beta" in reason
    # the ambiguous name is unusable, with the same explanation
    with pytest.raises(PluginError, match="duplicate reward 'sparkle'.*(dup_alpha.*dup_beta|dup_beta.*dup_alpha)"):
        reg.get("reward", "sparkle")
    assert "sparkle" not in reg.names("reward")
    # everything else keeps working: the two plugins' other components, a third plugin, the built-ins
    assert {"alpha_only", "beta_only", "glitter", "luminance"} <= set(reg.names("reward"))
    assert reg.create("reward", "glitter").space == "pixel"
    assert "ode" in reg.names("sampler") and reg.method("refl").name == "refl"


def test_duplicate_name_via_entry_points_keeps_cli_plugins_working(tmp_path: Path) -> None:
    """Two installed distributions registering one name: `trl-video plugins` still lists everything and
    reports the conflict (it used to stop every command)."""
    for dist, module in (("dup-one", "trlv_dup_one"), ("dup-two", "trlv_dup_two")):
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
            from trl_video import hookimpl

            class Shiny:
                space, differentiable = "pixel", False
                def __call__(self, videos, prompts):
                    return videos.flatten(1).mean(1)

            @hookimpl
            def trl_video_register_rewards(register):
                register("shiny", Shiny)
                register("{module}_own", Shiny)
        """))
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[trl_video]\n{module} = {module}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop(DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "trl_video.cli", "plugins"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "trlv_dup_one_own" in proc.stdout and "trlv_dup_two_own" in proc.stdout and "luminance" in proc.stdout
    broken = [line for line in proc.stdout.splitlines() if line.startswith("broken:")]
    assert any("duplicate reward 'shiny'" in b and "dup-one" in b and "dup-two" in b for b in broken), proc.stdout


def test_duplicate_of_a_builtin_names_trl_video() -> None:
    reg = build(reward_plugin("shadow_plugin", "luminance"))
    msg = reg.broken["shadow_plugin"]
    assert "duplicate reward 'luminance'" in msg
    assert "trl-video" in msg and "builtin" in msg and "shadow_plugin" in msg
    assert "builtin" in reg.broken
    assert "alignment" in reg.names("reward")


def test_raising_hook_is_reported_by_name_and_others_still_register() -> None:
    @hookimpl
    def trl_video_register_rewards(register: Callable[..., None]) -> None:
        register("half_done", _Reward)
        raise RuntimeError("kaboom in plugin init")

    boom = types.SimpleNamespace(__name__="boom_plugin", trl_video_register_rewards=trl_video_register_rewards)
    reg = build(reward_plugin("good_plugin", "sparkle"), boom)
    assert "boom_plugin" in reg.broken
    reason = reg.broken["boom_plugin"]
    assert "boom_plugin" in reason and "RuntimeError" in reason and "kaboom in plugin init" in reason
    assert "\n" not in reason
    assert "sparkle" in reg.names("reward")  # the healthy plugin is unaffected
    assert "luminance" in reg.names("reward")  # and so are the built-ins
    # a later lookup failure lists the broken plugin, so users see why a component may be missing
    with pytest.raises(PluginError, match="broken plugins: .*boom_plugin"):
        reg.get("reward", "nonexistent_reward")


def test_misspelled_hookimpl_is_reported() -> None:
    @hookimpl
    def trl_video_register_reward(register: Callable[..., None]) -> None:  # missing "s"
        register("never", _Reward)

    typo = types.SimpleNamespace(__name__="typo_plugin", trl_video_register_reward=trl_video_register_reward)
    reg = build(reward_plugin("good_plugin", "sparkle"), typo)
    reasons = " ".join(reg.broken.values())
    assert "trl_video_register_reward" in reasons
    assert "typo_plugin" in reasons
    assert "never" not in reg.names("reward")
    assert "sparkle" in reg.names("reward")


def test_every_misspelled_hookimpl_is_reported_under_its_plugin_name() -> None:
    @hookimpl
    def trl_video_register_reward(register: Callable[..., None]) -> None:
        pass

    @hookimpl
    def trl_video_register_sampler(register: Callable[..., None]) -> None:
        pass

    typo_a = types.SimpleNamespace(__name__="typo_a", trl_video_register_reward=trl_video_register_reward)
    typo_b = types.SimpleNamespace(__name__="typo_b", trl_video_register_sampler=trl_video_register_sampler)
    reg = build(typo_a, typo_b)
    assert set(reg.broken) == {"typo_a", "typo_b"}
    assert "trl_video_register_sampler" in reg.broken["typo_b"]


def test_disabled_env_var_blocks_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " blocked_plugin , allowed_plugn")
    reg = build(reward_plugin("blocked_plugin", "sparkle"), reward_plugin("allowed_plugin", "glitter"))
    assert "sparkle" not in reg.names("reward")
    assert "glitter" in reg.names("reward")
    # a name that matches no plugin is reported (a typo would otherwise silently disable nothing)
    assert list(reg.broken) == [f"{DISABLE_ENV}:allowed_plugn"]
    assert "did you mean 'allowed_plugin'" in reg.broken[f"{DISABLE_ENV}:allowed_plugn"]


def test_duplicate_disappears_when_one_plugin_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "dup_beta")
    reg = build(reward_plugin("dup_alpha", "sparkle"), reward_plugin("dup_beta", "sparkle"))
    assert reg.broken == {} and reg.get("reward", "sparkle").plugin == "dup_alpha"


def test_plugin_benchmarks_are_namespaced_with_the_bare_name_as_alias() -> None:
    def bench_plugin(name: str, *benches: str) -> types.SimpleNamespace:
        @hookimpl
        def trl_video_register_benchmarks(register: Callable[..., None]) -> None:
            for b in benches:
                register(b, lambda argv, _b=b: 0)

        return types.SimpleNamespace(__name__=name, trl_video_register_benchmarks=trl_video_register_benchmarks)

    reg = build(bench_plugin("alpha", "speed", "alpha-memory"), bench_plugin("beta", "speed", "quality"))
    assert {"alpha.speed", "alpha.memory", "beta.speed", "beta.quality", "overhead"} <= set(reg.names("bench"))
    assert reg.get("bench", "quality").name == "beta.quality"  # unambiguous alias
    assert reg.get("bench", "alpha-memory").name == "alpha.memory"  # the former name
    with pytest.raises(PluginError):
        reg.get("bench", "speed")  # two plugins: only the namespaced names
    assert reg.broken == {}


def test_disabled_env_var_can_block_the_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "builtin")
    reg = build(reward_plugin("allowed_plugin", "glitter"))
    assert reg.names("reward") == ["glitter"]
    assert reg.names("sampler") == []


def test_dotted_path_reward_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = f"trlv_dotted_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent("""
        import torch

        def score(inputs, prompts):
            return inputs.flatten(1).mean(1)

        score.space = "latent"
        score.differentiable = True

        class Nested:
            @staticmethod
            def fn(inputs, prompts):
                return inputs.flatten(1).sum(1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build()
    info = reg.get("reward", f"{mod}:score")
    assert info.distribution == "<dotted path>" and callable(info.obj)
    reward = reg.create("reward", f"{mod}:score")
    assert reward.space == "latent" and reward.differentiable is True
    import torch

    out = reward(torch.ones(2, 3, 4), ["a", "b"])
    assert torch.allclose(out, torch.ones(2))
    assert callable(reg.get("reward", f"{mod}:Nested.fn").obj)
    with pytest.raises(PluginError, match=f"'{mod}' has no attribute 'nope'"):
        reg.get("reward", f"{mod}:nope")
    with pytest.raises(PluginError, match="cannot import 'trlv_no_such_module_xyz'"):
        reg.get("reward", "trlv_no_such_module_xyz:score")


@pytest.mark.parametrize(("kind", "name", "package"), [("method", "fcrm", "vidrl-plugin-fcrm"),
                                                         ("method", "velr", "vidrl-plugin-velr"),
                                                         ("reward", "lrm", "vidrl-plugin-velr"),
                                                         ("method", "flow-grpo", "vidrl-plugin-rsm")])
def test_component_from_uninstalled_plugin_says_what_to_install(kind: str, name: str, package: str) -> None:
    """The hint comes from the ``[tool.trl-video] provides`` table of the checkout's plugin pyprojects."""
    reg = build()
    with pytest.raises(PluginError) as exc:
        reg.get(kind, name)
    assert f"unknown {kind} '{name}'" in str(exc.value)
    assert f"pip install {package}" in str(exc.value)
    assert f"pip install -e plugins/{package}" in str(exc.value)


def test_every_plugin_of_the_checkout_declares_what_it_provides() -> None:
    import importlib

    from trl_video.plugins import plugin_catalogue

    root = Path(__file__).resolve().parents[1]
    folders = sorted(p.parent.name for p in root.glob("plugins/*/pyproject.toml"))
    declared = {e.folder.name: e for e in plugin_catalogue(root)}
    assert sorted(declared) == folders, "add [tool.trl-video] provides = {...} to the plugin's pyproject.toml"
    modules = [importlib.import_module("vidrl_plugin_" + f.removeprefix("vidrl-plugin-").replace("-", "_"))
               for f in folders]
    reg = build(*modules)
    for entry in declared.values():  # the declaration matches what the plugin registers
        for kind, names in entry.provides.items():
            for name in names:
                assert reg.get(kind, name).distribution != "trl-video", (entry.distribution, kind, name)


def test_typo_gets_did_you_mean() -> None:
    reg = build()
    with pytest.raises(PluginError, match="did you mean 'luminance'"):
        reg.get("reward", "lumnance")
    with pytest.raises(PluginError, match="did you mean 'window'"):
        reg.get("sampler", "windw")
    with pytest.raises(PluginError, match="unknown hook point"):
        reg.get("rewards", "luminance")


def test_cli_plugins_lists_every_hook_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "trl_video.cli", "plugins"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    sections: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            sections[current] = []
        elif line.startswith("  ") and current is not None:
            sections[current].append(line.split())
    for section in ("samplers", "estimators", "losses", "rewards", "replays"):
        rows = sections.get(section)
        assert rows, f"section '{section}' missing or empty:\n{proc.stdout}"
        assert rows != [["(none)"]], section
        assert any(r[1] == "trl-video" for r in rows if len(r) >= 2), f"{section}: no trl-video row"
    assert any(r[:2] == ["refl", "trl-video"] for r in sections["methods"])
    names = {r[0] for r in sections["rewards"]}
    assert {"alignment", "luminance", "motion"} <= names


def test_every_data_file_of_the_core_is_packaged() -> None:
    """Non-Python files under trl_video/ (templates, tiny model assets) must be matched by the setuptools
    package-data globs, or a wheel install lacks them (the model card template once was)."""
    import glob

    import tomllib

    root = Path(__file__).resolve().parents[1]
    pkg = root / "trl_video"
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trl_video"]
    packaged = {Path(p).resolve() for g in globs for p in glob.glob(str(pkg / g), recursive=True)}
    data = [p.resolve() for p in pkg.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts]
    assert data, "expected templates and assets"
    missing = [str(p.relative_to(pkg)) for p in data if p not in packaged]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
