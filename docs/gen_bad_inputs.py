"""Build docs/bad-inputs.md from the error lines recorded by tests/test_bad_inputs.py (TRLV_BAD_INPUTS_LOG)."""
import json
import re
import sys
from collections import OrderedDict

rows = [json.loads(line) for line in open(sys.argv[1])]
seen = OrderedDict()
for r in rows:
    test = r["test"].split("::", 1)[1]
    err = r["error"]
    err = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ '\"]+", "<tmp>", err)
    err = re.sub(r"trlv_bad_rewards_[0-9a-f]{8}", "rewardmod", err)
    err = re.sub(r"eval-\d{8}-\d{6}", "eval-<time>", err)
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
       "Every row is a case in `tests/test_bad_inputs.py`, run through `trl_video.cli.main` (a few through a real",
       "subprocess). Each ends with exit code 2 (a signal: 128 + its number), exactly one `error:` line on stderr",
       "naming the key, file, plugin or checkpoint at fault, no traceback, and every file that existed before",
       "byte-identical (hashed before and after) unless the run legitimately continued.",
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
        "* Safe changes on `--resume` (`max_steps`, logging/saving/eval/hub keys) are printed (`resume: max_steps 2 -> 3`)",
        "  and recorded as `safe_recipe_changes` in the first `metrics.jsonl` row after the resume; other changes stop",
        "  with the list of keys unless `--accept-recipe-changes` is given (recorded as `accepted_recipe_changes`).",
        "* A stale lock (its process is gone on this host) is taken over with a `note:` on stderr.",
        "* The first SIGTERM/SIGINT finishes the step and writes a checkpoint; a second one stops at once (checkpoints",
        "  are written to a temporary folder and renamed, so even that never breaks a saved one).",
        "* `${env:NAME}` in a recipe reads the environment at run time; checkpoints, the model card and the dry-run plan",
        "  keep the reference. Strings under keys whose name contains token, key, secret, password or credential are",
        "  written as `***`.",
        "* YAML: `yaml.safe_load` semantics (no Python tags), files up to 1 MiB, at most 100,000 values after alias",
        "  expansion (measured without expanding), duplicate keys refused.", ""]
print("\n".join(out))
