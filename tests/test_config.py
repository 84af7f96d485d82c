"""Config parsing through trl.TrlParser, the shared config base, and LoRA through trl.ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from trl_video.config import ConfigBase, MethodConfig, VideoRewardConfig, config_from_dict, doc_field
from trl_video.errors import ConfigError, TrlVideoError
from trl_video.parsing import RecipeParser, parse_train_args


@dataclass
class ToyMethodConfig(MethodConfig):
    mode: Literal["a", "b"] = doc_field("a", "A choice.")
    steps: int = doc_field(2, "At least one.", ge=1)
    low: float = doc_field(0.1, "Below high.", gt=0.0)
    high: float = doc_field(0.9, "Above low.", le=1.0)
    maybe: Literal["x", "y"] | None = doc_field(None, "Optional choice.")

    def validate(self) -> None:
        super().validate()
        self.require(self.low < self.high, "high", f"must be > low ({self.low})")


@pytest.mark.parametrize(("kwargs", "key", "text"), [
    ({"mode": "c"}, "method_args.mode", "must be one of a|b, got 'c'"),
    ({"steps": 0}, "method_args.steps", "must be >= 1, got 0"),
    ({"low": 0.0}, "method_args.low", "must be > 0.0, got 0.0"),
    ({"high": 1.5}, "method_args.high", "must be <= 1.0, got 1.5"),
    ({"low": 0.5, "high": 0.4}, "method_args.high", "must be > low (0.5), got 0.4"),
    ({"maybe": "z"}, "method_args.maybe", "must be one of x|y, got 'z'"),
])
def test_method_config_base_names_the_key(kwargs: dict, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        ToyMethodConfig(**kwargs)
    assert info.value.key == key and str(info.value) == f"{key} {text}"


def test_method_config_from_dict() -> None:
    assert ToyMethodConfig(maybe="y").maybe == "y" and ToyMethodConfig().maybe is None
    assert ToyMethodConfig.from_dict({"high": 1}, "m").high == 1.0  # int -> float
    with pytest.raises(ConfigError, match="m: unknown key 'stepz'; did you mean 'steps'"):
        ToyMethodConfig.from_dict({"stepz": 3}, "m")
    with pytest.raises(ConfigError, match="m: key 'mode' must be one of a|b, got int 3"):
        ToyMethodConfig.from_dict({"mode": 3}, "m")
    assert issubclass(VideoRewardConfig, ConfigBase)


def test_every_shipped_method_config_uses_the_base() -> None:
    from trl_video.plugins import get_registry

    reg = get_registry()
    for info in reg.items("method"):
        assert issubclass(info.obj.config_cls, MethodConfig), info.name


def test_trl_parser_recipe_set_and_flags(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tiny-wan", "max_steps": 5, "learning_rate": 1,
                                      "method_args": {"kl_weight": 0.5, "kl_timesteps": 2}}))
    args = parse_train_args(["--recipe", str(recipe), "--set", "method_args.kl_weight=0.1", "--max_steps", "7",
                             "--output-dir", str(tmp_path / "o"), "--lora_target_modules", "to_q", "to_v",
                             "--no_use_peft", "--dry-run"])
    c = args.config
    assert isinstance(c.learning_rate, float) and c.learning_rate == 1.0
    assert c.max_steps == 7 and c.output_dir == str(tmp_path / "o") and not c.use_peft and args.dry_run
    assert c.method_args == {"kl_weight": 0.1, "kl_timesteps": 2}
    assert c.lora_target_modules == ["to_q", "to_v"]
    assert args.recipe["max_steps"] == 7 and args.recipe["use_peft"] is False and "seed" not in args.recipe
    # a mapping field as a flag replaces the mapping; `--config` is TRL's name for the recipe
    args = parse_train_args(["--config", str(recipe), "--method_args", "{kl_weight: 0.3}"])
    assert args.config.method_args == {"kl_weight": 0.3} and args.recipe_path == str(recipe)
    assert "--sampler_args" in RecipeParser().format_help()
    assert args.config.trackers == ["tensorboard"]  # the default of a `str | list[str]` field survives TrlParser
    assert parse_train_args(["--report_to", "tensorboard", "wandb"]).config.trackers == ["tensorboard", "wandb"]


@pytest.mark.parametrize(("argv", "text"), [
    (["--max_steps", "ten"], "command line: argument --max_steps/--max-steps: invalid int value: 'ten'"),
    (["--max_stepz", "3"], "unknown option '--max_stepz'; did you mean '--max_steps'?"),
    (["--method_args", "[1]"], "not a YAML mapping"),
    (["--group_size", "0"], "command line: group_size must be >= 1, got 0"),
])
def test_trl_parser_flag_errors(argv: list[str], text: str) -> None:
    with pytest.raises(TrlVideoError) as info:
        parse_train_args(argv)
    assert text in str(info.value)


def test_deprecated_lora_keys_map_onto_model_config() -> None:
    with pytest.warns(FutureWarning, match="'lora_rank' is deprecated, use 'lora_r'"):
        c = config_from_dict({"use_lora": True, "lora_rank": 4})
    assert c.use_peft and c.lora_r == 4
    with pytest.warns(FutureWarning, match="'use_lora' is deprecated"):
        assert not VideoRewardConfig(use_lora=False).use_peft  # the Python keyword too
    with pytest.raises(ConfigError, match="'lora_rank' and 'lora_r' are the same setting"):
        config_from_dict({"lora_rank": 4, "lora_r": 8})


def test_peft_config_comes_from_trl_model_config() -> None:
    """trl.get_peft_config(ModelConfig) gives the LoraConfig the policy had before the switch: alpha = rank,
    no dropout, no task type, the four attention projections."""
    import trl

    c = config_from_dict({"lora_r": 4, "lora_target_modules": ["to_q"]})
    mc = c.model_config()
    assert isinstance(mc, trl.ModelConfig) and mc.lora_r == 4 and mc.lora_alpha == 4
    lora = c.peft_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (4, 4, 0.0, None)
    assert set(lora.target_modules) == {"to_q"} and lora.bias == "none" and not lora.use_dora
    assert config_from_dict({"use_peft": False}).peft_config() is None


def test_prompt_mixture_through_trl_get_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TRL DatasetMixtureConfig mapping (prompt_datasets) and plain files both load through trl.get_dataset."""
    import datasets

    from trl_video.data import load_prompts

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(f'{{"prompt": "a{i}", "x": {i}}}\n' for i in range(6)))
    b.write_text("".join(f'{{"prompt": "b{i}"}}\n' for i in range(2)))
    mixture = {"datasets": [{"path": "json", "data_files": str(a), "columns": ["prompt"], "fraction": 0.5},
                            {"path": "json", "data_files": str(b), "fraction": 0.5}]}
    # fractions 1:1 capped by the smaller set: the first 2 rows of each
    assert load_prompts(mixture) == ["a0", "a1", "b0", "b1"]
    assert load_prompts(str(a)) == [f"a{i}" for i in range(6)]
    config = config_from_dict({"prompt_datasets": mixture})
    assert config.prompt_datasets == mixture
    with pytest.raises(ConfigError, match="prompt_datasets must be a trl.DatasetMixtureConfig mapping"):
        config_from_dict({"prompt_datasets": {"datasetz": []}})
