"""RSM isolated estimator study (the paper's Sec. 5.1 / Fig. 8) on a 2-D Gaussian mixture with a linear reward.

Reference p0 = sum_k w_k N(m_k, I) on R^2, rectified-flow path x_t = (1-t) x0 + t eps, reward r(x) = a.x,
KL temperature beta. Everything is closed form:

* the reference model is exact: posterior mean E[x0 | x_t] of the mixture (no network), used through the core
  schedule's DDIM/posterior step (eta = 1: Markovian stochasticity, as the paper's toy);
* the tilted target p* ∝ p0 exp(r / beta) is again a mixture: N(m_k + a / beta, I) with weights
  ∝ w_k exp(a.m_k / beta); the exact guidance is g*(x_t) = s*_t(x_t) - s_ref_t(x_t) (Eq. 8).

Estimators (all in score units, the g_hat of the plugin's loss, divided by beta):
  fo-current      grad_x r(x0_hat(x_t))                                     (Tweedie Jacobian, 1 NFE)
  fo-look k       grad_{x_t} mean_b r(x0_hat(k-1 more steps of x_s^b)), pathwise through the whole Jacobian chain
  zo-look k       (d mu/d x_t)^T mean_b (V_b - centre) eps_b / sigma  (Stein), V_b = r(x0_hat after k-1 more steps)
  zo-look-scoreform  (sigma / c) mean_b (V_b - centre) eps_b: the form the RSM loss uses (mean shift = c g)
with ``k = full`` rolling to t = 0; ``--localise`` variants continue by ODE after the branching step
(stochasticity localisation: the value function itself changes). RMSE = sqrt(mean ||g_hat - g*||^2) over
states x_t drawn from the reference marginal.

    python benchmarks/rsm/estimators.py --out benchmarks/rsm/results     # ~1 minute on one CPU core
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from trl_video.models.schedule import NoiseSchedule

F64 = torch.float64  # the study runs in double precision (main sets it as the default while it runs)
MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=F64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
REWARD = torch.tensor([1.0, 0.5], dtype=F64)
BETA = 1.0
SCH = NoiseSchedule("flow")


def mixture_score_and_x0(x: torch.Tensor, t: float, means: torch.Tensor, weights: torch.Tensor):
    """Score of the noised mixture at t and the posterior mean E[x0 | x_t] (unit component covariance)."""
    a, v = 1.0 - t, (1.0 - t) ** 2 + t**2
    diff = x.unsqueeze(-2) - a * means  # [..., K, 2]
    logw = torch.log(weights) - (diff**2).sum(-1) / (2 * v)
    gamma = torch.softmax(logw, -1).unsqueeze(-1)
    score = (gamma * (-diff / v)).sum(-2)
    x0 = (gamma * (means + a * diff / v)).sum(-2)
    return score, x0


def tilted():
    means = MEANS + REWARD / BETA
    logw = torch.log(WEIGHTS) + MEANS @ REWARD / BETA
    return means, torch.softmax(logw, 0)


def exact_guidance(x: torch.Tensor, t: float) -> torch.Tensor:
    m, w = tilted()
    return mixture_score_and_x0(x, t, m, w)[0] - mixture_score_and_x0(x, t, MEANS, WEIGHTS)[0]


def denoise(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) of the exact reference model."""
    _, x0 = mixture_score_and_x0(x, t, MEANS, WEIGHTS)
    eps = (x - (1 - t) * x0) / t
    return x0, eps


def step(x: torch.Tensor, t: float, s: float, eta: float, gen: torch.Generator) -> torch.Tensor:
    x0, eps = denoise(x, t)
    mean, std = SCH.ddim_step(x0, eps, torch.tensor(t), torch.tensor(s), eta)
    return mean + std * torch.randn(mean.shape, generator=gen) if eta > 0 else mean


def coefficients(t: float, s: float) -> tuple[float, float]:
    """(sigma_t, c_t): std of the stochastic step and the score coefficient of its mean (mu = a x + c score)."""
    x = torch.zeros(1, 2)
    # mean as a function of the score: x0_hat = (x + t^2 score)/(1 - t), eps_hat = -t score
    def mean_of(score: float) -> torch.Tensor:
        sc = torch.full((1, 2), score)
        return SCH.ddim_step((x + t**2 * sc) / (1 - t), -t * sc, torch.tensor(t), torch.tensor(s), 1.0)[0]
    c = float((mean_of(1.0) - mean_of(0.0))[0, 0])
    _, std = SCH.ddim_step(x, x, torch.tensor(t), torch.tensor(s), 1.0)
    return float(std), c


def value(x_s: torch.Tensor, grid: list[float], i: int, depth: int | None, localise: bool,
          gen: torch.Generator) -> torch.Tensor:
    """r(x0_hat) after rolling x_s (at grid[i + 1]) ``depth - 1`` more steps (None = to t = 0)."""
    S = len(grid) - 1
    land = S if depth is None else min(S, i + depth)
    x = x_s
    for j in range(i + 1, land):
        x = step(x, grid[j], grid[j + 1], 0.0 if localise else 1.0, gen)
    x0 = x if land == S else denoise(x, grid[land])[0]
    return x0 @ REWARD


def estimate(kind: str, x_t: torch.Tensor, grid: list[float], i: int, depth: int | None, width: int, centre: bool,
             localise: bool, gen: torch.Generator, form: str = "jacobian") -> tuple[torch.Tensor, int]:
    """(g_hat [N, 2], NFE per state)."""
    t, s = grid[i], grid[i + 1]
    S = len(grid) - 1
    if kind == "fo-current":
        x = x_t.clone().requires_grad_(True)
        g = torch.autograd.grad((denoise(x, t)[0] @ REWARD).sum(), x)[0]
        return g / BETA, 1
    sigma, c = coefficients(t, s)
    x = x_t.clone().requires_grad_(True)
    x0, eps_hat = denoise(x, t)
    mean, std = SCH.ddim_step(x0, eps_hat, torch.tensor(t), torch.tensor(s), 1.0)
    noise = torch.randn(x_t.shape[0], width, 2, generator=gen)
    land = S if depth is None else min(S, i + depth)
    calls_per_child = (land - i - 1) + (0 if land == S else 1)
    nfe = 1 + width * calls_per_child
    if kind == "fo-look":
        xs = (mean.detach().unsqueeze(1) + std * noise).requires_grad_(True)
        v = value(xs, grid, i, depth, localise, gen)
        d_xs = torch.autograd.grad(v.sum(), xs)[0].mean(1)  # E[grad_{x_s} V]
    else:
        with torch.no_grad():
            v = value(mean.detach().unsqueeze(1) + std * noise, grid, i, depth, localise, gen)  # [N, B]
        if centre:
            v = v - v.mean(1, keepdim=True)
        d_xs = (v.unsqueeze(-1) * noise).mean(1) / sigma  # Stein: E[grad_{x_s} V] = E[V eps] / sigma
    if form == "score":  # the RSM loss's g_hat: mean shift sigma^2 E[grad V] expressed as c * g
        return (sigma**2 / c) * d_xs / BETA, nfe
    # grad_{x_t} E[V(mu(x_t) + sigma eps)] = (d mu / d x_t)^T E[grad_{x_s} V]  (the full Jacobian chain)
    return torch.autograd.grad(mean, x, d_xs)[0] / BETA, nfe


VARIANTS = (("fo-look", False, False, "jacobian"), ("zo-look", True, False, "jacobian"),
            ("zo-look", False, False, "jacobian"), ("zo-look", True, True, "jacobian"),
            ("zo-look", True, False, "score"))


def rmse(g: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((g - truth) ** 2).sum(-1).mean().sqrt())


def main(argv: list[str] | None = None) -> int:
    """Runs the study with float64 as torch's default dtype and restores the caller's (importing this module, e.g.
    from a test, changes nothing global)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        return run(argv)
    finally:
        torch.set_default_dtype(previous)


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of the grid")
    ap.add_argument("--states", type=int, default=256, help="states x_t per timestep")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[1, 3, 5, 7], help="step indices i evaluated")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/rsm/results")
    ap.add_argument("--from-json", metavar="PATH", help="re-render the table, claims and plot of a finished run")
    a = ap.parse_args(argv)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        table = render_table(saved["rows"], saved["args"]["widths"]) + "\n\n" + claims(saved["rows"])
        (Path(a.out) / "estimators.md").write_text(table + "\n")
        plot(saved["rows"], saved["args"]["timesteps"], Path(a.out) / "estimators.png")
        print(table)
        return 0
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(a.seed)
    grid = [float(v) for v in SCH.timesteps(a.steps)]
    rows = []
    t0 = time.perf_counter()
    for i in a.timesteps:
        t = grid[i]
        comp = torch.multinomial(WEIGHTS, a.states, replacement=True, generator=gen)
        x0 = MEANS[comp] + torch.randn(a.states, 2, generator=gen)
        x_t = (1 - t) * x0 + t * torch.randn(a.states, 2, generator=gen)
        truth = exact_guidance(x_t, t)
        scale = float((truth**2).sum(-1).mean().sqrt())
        g, nfe = estimate("fo-current", x_t, grid, i, 0, 1, False, False, gen)
        rows.append({"i": i, "t": t, "estimator": "fo-current", "depth": 0, "width": 1, "centre": False,
                     "localise": False, "nfe": nfe, "rmse": rmse(g, truth), "truth_rms": scale})
        depths: list[int | None] = [1, 2, 4, None]
        for depth in depths:
            for width in a.widths:
                for kind, centre, localise, form in VARIANTS:
                    if depth is not None and i + depth >= a.steps and depth != 1:
                        continue  # the same as the full rollout
                    if form == "score" and depth != 1:
                        continue
                    g, nfe = estimate(kind, x_t, grid, i, depth, width, centre, localise, gen, form)
                    rows.append({"i": i, "t": t, "estimator": kind + ("-scoreform" if form == "score" else ""),
                                 "depth": depth if depth is not None else "full",
                                 "width": width, "centre": centre, "localise": localise, "nfe": nfe,
                                 "rmse": rmse(g, truth), "truth_rms": scale})
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators.json").write_text(json.dumps({"args": vars(a), "seconds": seconds, "rows": rows}, indent=1))
    table = render_table(rows, a.widths) + "\n\n" + claims(rows)
    (out / "estimators.md").write_text(table + "\n")
    plot(rows, a.timesteps, out / "estimators.png")
    print(table)
    print(f"\n{len(rows)} estimates in {seconds:.1f} s; wrote {out}/estimators.json, estimators.md, estimators.png")
    return 0


def claims(rows: list[dict]) -> str:
    """The paper's two claims about this study (Sec. 5.1, Fig. 8b-c), checked cell by cell on ``rows``:
    centring lowers RMSE (same t, depth, width); a one-step lookahead beats the full rollout at equal samples
    (same width B) and at equal compute (the full rollout with the smallest NFE >= the lookahead's)."""
    def pick(est: str, depth: Any, centre: bool, loc: bool = False) -> dict[tuple[float, int], dict]:
        return {(r["t"], r["width"]): r for r in rows if r["estimator"] == est and str(r["depth"]) == str(depth)
                and r["centre"] == centre and r["localise"] == loc}

    lines = ["Claims, checked on every cell (zeroth order unless said):"]
    wins, total, ratios = 0, 0, []
    for depth in ("1", "2", "4", "full"):
        on, off = pick("zo-look", depth, True), pick("zo-look", depth, False)
        for key in on.keys() & off.keys():
            total += 1
            wins += on[key]["rmse"] < off[key]["rmse"]
            ratios.append(off[key]["rmse"] / on[key]["rmse"])
    lines.append(f"* centring lowers RMSE in {wins} of {total} (t, depth, B) cells; RMSE ratio off/on "
                 f"{min(ratios):.2f}-{max(ratios):.2f}.")
    for est, centre in (("zo-look", True), ("fo-look", False)):
        one, full = pick(est, "1", centre), pick(est, "full", centre)
        same = sorted(one.keys() & full.keys())
        lost = [f"t={t:.2f} B={b}" for t, b in same if one[(t, b)]["rmse"] >= full[(t, b)]["rmse"]]
        lines.append(f"* {est} k=1 vs full rollout at equal samples (same B): k=1 lower in "
                     f"{len(same) - len(lost)} of {len(same)} cells" + (f" (not at {', '.join(lost)})" if lost else ""))
        eq, lost_nfe = 0, []
        for (t, b), r in sorted(one.items()):
            richer = sorted((f for (tf, _), f in full.items() if tf == t and f["nfe"] >= r["nfe"]),
                            key=lambda f: f["nfe"])
            if richer:
                eq += 1
                if r["rmse"] >= richer[0]["rmse"]:
                    lost_nfe.append(f"t={t:.2f} B={b}")
        lines.append(f"* {est} k=1 vs full rollout at equal compute (full rollout with at least the NFE): k=1 lower "
                     f"in {eq - len(lost_nfe)} of {eq} cells" + (f" (not at {', '.join(lost_nfe)})" if lost_nfe else ""))
    return "\n".join(lines)


def render_table(rows: list[dict], widths: list[int]) -> str:
    lines = ["| t | estimator | depth | centre | localise | " + " | ".join(f"B={w}" for w in widths) + " |",
             "|---|---|---|---|---|" + "---|" * len(widths)]
    keyed: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        keyed.setdefault((r["t"], r["estimator"], str(r["depth"]), r["centre"], r["localise"]), {})[r["width"]] = r
    for (t, est, depth, centre, loc), by_w in keyed.items():
        if est == "fo-current":
            r = by_w[1]
            cells = [f"{r['rmse']:.3f} (1)"] + [""] * (len(widths) - 1)
        else:
            cells = [f"{by_w[w]['rmse']:.3f} ({by_w[w]['nfe']})" if w in by_w else "" for w in widths]
        lines.append(f"| {t:.2f} | {est} | {depth} | {'y' if centre else 'n'} | {'y' if loc else 'n'} | "
                     + " | ".join(cells) + " |")
    lines.append("\nCells: RMSE vs the exact guidance (NFE per state). |g*| RMS per t: "
                 + ", ".join(f"t={r['t']:.2f}: {r['truth_rms']:.3f}" for r in rows if r["estimator"] == "fo-current"))
    return "\n".join(lines)


def plot(rows: list[dict], timesteps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(timesteps), figsize=(4.2 * len(timesteps), 3.8), sharey=False)
    for ax, i in zip(axes, timesteps):
        sub = [r for r in rows if r["i"] == i]
        styles = {("zo-look", True, False): "-", ("zo-look", False, False): ":", ("zo-look", True, True): "--",
                  ("fo-look", False, False): "-."}
        colors = {"1": "C0", "2": "C1", "4": "C2", "full": "C3"}
        for (est, centre, loc), ls in styles.items():
            for depth, col in colors.items():
                pts = sorted((r["nfe"], r["rmse"]) for r in sub if r["estimator"] == est and str(r["depth"]) == depth
                             and r["centre"] == centre and r["localise"] == loc)
                if pts:
                    label = f"{est} k={depth}" + (" centred" if centre else "") + (" localised" if loc else "")
                    ax.plot(*zip(*pts), ls, color=col, marker="o", ms=3, label=label)
        fo = [r for r in sub if r["estimator"] == "fo-current"]
        ax.axhline(fo[0]["rmse"], color="k", lw=0.8, label="fo-current (1 NFE)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"t = {sub[0]['t']:.2f} (step {i})")
        ax.set_xlabel("NFE per state")
    axes[0].set_ylabel("RMSE vs exact guidance")
    axes[-1].legend(fontsize=5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
