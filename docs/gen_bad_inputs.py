"""Build docs/bad-inputs.md from the error lines recorded by tests/test_bad_inputs.py (TRLV_BAD_INPUTS_LOG)."""
import json
import re
import sys
from collections import OrderedDict

from trl_video.checkpointing import ACCEPTABLE_RESUME_KEYS, SAFE_RESUME_KEYS


def keys(names: frozenset[str]) -> str:
    return ", ".join(f"`{k}`" for k in sorted(names))


rows = [json.loads(line) for line in open(sys.argv[1])]
seen = OrderedDict()
for r in rows:
    test = r["test"].split("::", 1)[1]
    err = r["error"]
    err = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ '\"]+", "<tmp>", err)
    err = re.sub(r"trlv_bad_rewards_[0-9a-f]{8}", "rewardmod", err)
    err = re.sub(r"eval-\d{8}-\d{6}", "eval-<time>", err)
    err = re.sub(r"\(pid \d+ on [^,]+,", "(pid <pid> on <host>,", err)
    err = err.replace("|", "\\|")
    seen.setdefault(test, (r["code"], err))

def case(test: str) -> str:
    m = re.match(r"(test_\w+)(?:\[(.*)\])?$", test)
    fn, pid = m.group(1), m.group(2) or ""
    pid = re.sub(r"^(dry-run|train)-|-(dry-run|train)$", "", pid)
    return f"{fn}[{pid}]" if pid else fn

inputs = OrderedDict()
for test, (code, err) in seen.items():
    inputs.setdefault(case(test), []).append((test, code, err))

out = ["# Bad inputs and faults: what each one gives", "",
       "Every row is a case in `tests/test_bad_inputs.py`, run through `trl_video.cli.main` in the test process",
       "(`test_bad_recipe_in_a_real_process` and `test_sigterm_real_subprocess` run the `trl-video` console script",
       "in a real subprocess, for the exit status a shell sees). Each ends with exit code 2 (a signal: 128 + its",
       "number), exactly one `error:` line on stderr naming the key, file, plugin or checkpoint at fault, no",
       "traceback, and every file that existed under the test's folder byte-identical (sha256, size and mtime",
       "compared before and after every failing call) unless the run legitimately continued (a signal).",
       "Recipe-level cases run twice, with `--dry-run` and with `train`: both give the same line, before any",
       "weights load, because both call `trl_video.validation.validate_config`.",
       "",
       "This table is generated from the error lines the tests recorded (paths shortened to `<tmp>`):",
       "`TRLV_BAD_INPUTS_LOG=/tmp/e.jsonl python -m pytest tests/test_bad_inputs.py` and",
       "`python docs/gen_bad_inputs.py /tmp/e.jsonl > docs/bad-inputs.md`.",
       "",
       f"**{len(inputs)} distinct bad inputs and faults** ({len(seen)} test runs).",
       "",
       "| # | case (test[id]) | exit | error |", "|---|---|---|---|"]
for i, (name, runs) in enumerate(inputs.items(), 1):
    code, err = runs[0][1], runs[0][2]
    modes = " (dry-run and train)" if len(runs) > 1 else ""
    out.append(f"| {i} | `{name}`{modes} | {code} | `{err}` |")
out += ["", "## Not an error, but worth knowing", "",
        "* **A recipe is code.** A dotted path `pkg.module:attr` in `reward`, `sampler`, `estimator`, `loss`,",
        "  `replay` or `method` imports that module, which runs its top-level code, also under `--dry-run`.",
        "  Only run recipes you trust, as you would only run scripts you trust.",
        "* Safe changes on `--resume` are printed (`resume: max_steps 2 -> 3`) and recorded as `safe_recipe_changes` in",
        "  the first `metrics.jsonl` row after the resume: " + keys(SAFE_RESUME_KEYS) + ".",
        "* Other changes stop with the list of keys. `--accept-recipe-changes` takes these, and they take effect (the new",
        "  optimiser hyperparameters, base LR and schedule, and EMA decay are put over the restored state; a changed",
        "  reward starts without the old reward's state; a changed prompt list starts a new epoch over the new list),",
        "  recorded as `accepted_recipe_changes`: " + keys(ACCEPTABLE_RESUME_KEYS) + ".",
        "  Any other change (seed, model, LoRA layout, batch shape, components, precision, ...) is refused even with the",
        "  flag: the checkpoint's random state, tensors or component states fix it, so accepting it would be ignored.",
        "* After a resume, `metrics.jsonl` drops the rows logged after the checkpoint and TensorBoard hides those events",
        "  (SummaryWriter `purge_step`): no step appears twice.",
        "* A stale lock (its process is gone on this host) is taken over with a `note:` on stderr.",
        "* The first SIGTERM/SIGINT finishes the step and writes a checkpoint; a second one stops at once (checkpoints",
        "  are written to a temporary folder and renamed, so even that never breaks a saved one).",
        "* `${env:NAME}` in a recipe reads the environment at run time; checkpoints, the model card and the dry-run plan",
        "  keep the reference. Strings under keys whose name contains token, key, secret, password or credential are",
        "  written as `***`.",
        "* YAML: `yaml.safe_load` semantics (no Python tags), files up to 1 MiB, at most 100,000 values after alias",
        "  expansion (measured without expanding), duplicate keys refused.", ""]
print("\n".join(out))
