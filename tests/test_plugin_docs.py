"""docs/plugin-authors.md: every ``python`` block runs as written, in order, in one namespace (the last block
registers the page's components as a plugin and trains the page's method for two steps)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugin-authors.md"


def test_plugin_author_page_examples_run(monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 5, "expected a reward, a replay, a sampler, an estimator+loss+method and a trial block"
    module = types.ModuleType("plugin_docs_example")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for i, code in enumerate(blocks):
        exec(compile(code, f"{PAGE.name}[python block {i}]", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer.sampler).__name__ == "PowerGridSampler" and type(trainer.loss).__name__ == "RWRLoss"
    assert type(trainer.replay).__name__ == "BestSoFarReplay" and trainer.reward.space == "latent"
    assert "loss/policy" in trainer.history[-1] and trainer.history[-1]["grad_norm/policy"] > 0
    # the replay component's state goes into the checkpoint and comes back
    state = trainer.replay.state_dict()
    fresh = namespace["BestSoFarReplay"]()
    fresh.load_state_dict(state)
    assert fresh.buffer.rewards.tolist() == trainer.replay.buffer.rewards.tolist()
