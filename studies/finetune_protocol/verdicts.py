"""The registered decision rule of full_design.md applied to a study root (one study folder per data set).

    python studies/finetune_protocol/verdicts.py runs/full_vp            # prints the verdict table
    python studies/finetune_protocol/verdicts.py runs/full_vp --write studies/finetune_protocol/full_vp

Directional claims (full_design.md): Holm's adjustment over the data sets × rows of each metric (as in
report.py); **confirmed** when the effect has the claimed sign with Holm p < 0.05 on at least 3 of the 4
sets (all sets when fewer than 4) and is significant against it on none; **refuted** when it is
significant against the claimed sign on at least one set; otherwise **not confirmed**. Claim 1: confirmed
when no set has the pre-trained row significantly better than the control. Claim 6: Spearman ρ > 0 with
p < 0.05 over the runs whose relative score error is below 0.5. The two no-effect claims (2b, 4) are read
as follows (written after the VP moons and rings results were seen, so they are stated, not registered):
2b is refuted when the normalized FPE arm significantly lowers the NLL gap on a set, else consistent;
claim 4 is confirmed when every interval of the conservativity arm's two NLL gaps lies inside ±0.01
nats, refuted when one lies entirely outside, else not confirmed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from scipy import stats

from fpe_lab import runs
from fpe_lab.study import PRETRAINED, holm, studies_under, summarize

FPE_NORM = "reg=fpe fpe_weighting=normalized lam=0.1"
FPE_G2 = "reg=fpe fpe_weighting=g2 lam=0.0375"
HODSM = "reg=hodsm lam=0.1"
CONSERVATIVE = "reg=conservative lam=0.1"
# (claim, metric, row, claimed sign of Δ = row − control: −1 lower, +1 higher)
DIRECTIONAL = (
    ("2a. normalized FPE narrows W2(q_ODE, q_SDE)", "gap_w2_ode_sde", FPE_NORM, -1),
    ("2a'. … and TV(q_ODE, q_SDE) (secondary: not in claims.md)", "gap_tv_ode_sde", FPE_NORM, -1),
    ("2c. normalized FPE makes the SDE model worse (its NLL gap)", "sde_nll_gap_nats", FPE_NORM, +1),
    ("3a. high-order DSM narrows W2(q_ODE, q_SDE)", "gap_w2_ode_sde", HODSM, -1),
    ("3b. high-order DSM brings q_SDE closer to the truth (KL)", "gap_kl_truth_sde", HODSM, -1),
    ("3c. high-order DSM lowers the PF-ODE NLL gap (a finding of the earlier studies, not in claims.md)",
     "nll_gap_nats", HODSM, -1),
    ("5. g² at α/D² destroys the score (relative score error)", "score_error_rel", FPE_G2, +1),
    ("5'. … and the NLL gap", "nll_gap_nats", FPE_G2, +1),
)


def _adjusted(summaries: dict[str, dict[str, dict]], metric: str) -> dict[tuple[str, str], float]:
    tests = [(n, a) for n, rows in summaries.items() for a, r in rows.items() if f"{metric}_p" in r]
    return dict(zip(tests, holm([summaries[n][a][f"{metric}_p"] for n, a in tests]), strict=True))


def _cells(summaries, metric, row, adjusted) -> list[tuple[str, float, float, float, float]]:
    """(set, Δ, lo, hi, Holm p) of ``row``'s paired difference to the control on each set."""
    out = []
    for name, rows in summaries.items():
        r = rows[row]
        out.append((name, r[f"{metric}_diff"], r[f"{metric}_lo"], r[f"{metric}_hi"], adjusted[(name, row)]))
    return out


def _directional(cells, sign: int) -> str:
    need = min(3, len(cells))
    good = sum(1 for _, d, _, _, p in cells if p < 0.05 and d * sign > 0)
    bad = sum(1 for _, d, _, _, p in cells if p < 0.05 and d * sign < 0)
    if bad:
        return f"**refuted** ({bad} set(s) significant against)"
    return f"**confirmed** ({good} of {len(cells)})" if good >= need else f"not confirmed ({good} of {len(cells)})"


def _fmt(cells) -> str:
    return "; ".join(f"{n} {d:+.3g} [{lo:+.3g}, {hi:+.3g}] (Holm p {p:.2g})" for n, d, lo, hi, p in cells)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("root", type=Path, help="the folder run.sh wrote (one study folder per data set)")
    p.add_argument("--write", type=Path, default=None, metavar="DIR", help="also write DIR/verdicts.md")
    args = p.parse_args()
    try:
        found = studies_under(args.root)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    folders = [f for _, f in found.values()]
    plans = {name: plan for name, (plan, _) in found.items()}
    summaries = {f.name: {r["arm"]: r for r in summarize(plans[f.name], f)} for f in folders}
    lines = ["| claim | per set: Δ to the control [95% interval] (Holm p) | verdict |", "|---|---|---|"]
    adj = _adjusted(summaries, "nll_gap_nats")
    cells = _cells(summaries, "nll_gap_nats", PRETRAINED, adj)
    worse = [c for c in cells if c[4] < 0.05 and c[1] < 0]
    lines.append(f"| 1. the continued control is never worse than the pre-trained model (PF-ODE NLL gap, "
                 f"pre-trained − control) | {_fmt(cells)} | "
                 + ("**refuted**" if worse else "**confirmed**") + " |")
    for claim, metric, row, sign in DIRECTIONAL:
        cells = _cells(summaries, metric, row, _adjusted(summaries, metric))
        lines.append(f"| {claim} | {_fmt(cells)} | {_directional(cells, sign)} |")
    cells = _cells(summaries, "nll_gap_nats", FPE_NORM, adj)
    lowered = [c for c in cells if c[4] < 0.05 and c[1] < 0]
    lines.append(f"| 2b. … without lowering the PF-ODE NLL gap | {_fmt(cells)} | "
                 + (f"**refuted** (lowered on {len(lowered)})" if lowered else "consistent") + " |")
    inside, outside, parts = True, False, []
    for metric in ("nll_gap_nats", "sde_nll_gap_nats"):
        cells = _cells(summaries, metric, CONSERVATIVE, _adjusted(summaries, metric))
        inside &= all(-0.01 <= lo and hi <= 0.01 for _, _, lo, hi, _ in cells)
        outside |= any(lo > 0.01 or hi < -0.01 for _, _, lo, hi, _ in cells)
        parts.append(f"{metric}: {_fmt(cells)}")
    lines.append(f"| 4. conservativity changes neither NLL gap by more than 0.01 nats | {'; '.join(parts)} | "
                 + ("**refuted**" if outside else "**confirmed**" if inside else "not confirmed") + " |")
    points = []
    for f in folders:
        plan = plans[f.name]
        labelled = [runs.run_dir(plan.pretrain_config(s), f / "pretrain") for s in plan.seeds]
        labelled += [runs.run_dir(plan.config(a, s, f), f) for a in plan.arms for s in plan.seeds]
        for rf in labelled:
            rep = runs.load(rf).report
            if rep is None or rep.gap is None or not rep.mean.get("score_error_rel", math.inf) < 0.5:
                continue
            t, r = rep.times, [math.sqrt(max(v, 0.0)) for v in rep.per_time.fpe_residual]
            integral = sum(0.5 * (r[i] + r[i + 1]) * (t[i + 1] - t[i]) for i in range(len(t) - 1))
            points.append((f.name, integral, rep.gap.ode_vs_sde["w2"]))
    rho, pval = stats.spearmanr([q[1] for q in points], [q[2] for q in points])
    per_set = ", ".join(
        f"{n} {stats.spearmanr([q[1] for q in points if q[0] == n], [q[2] for q in points if q[0] == n])[0]:.2f}"
        for n in summaries)
    lines.append(f"| 6. W2(q_ODE, q_SDE) rank-correlates with ∫ sqrt(E‖R‖²) dt (runs with score error < 0.5) | "
                 f"pooled ρ = {rho:.3f} (p {pval:.2g}, {len(points)} runs); within each set (not the registered "
                 f"test): {per_set} | " + ("**confirmed**" if rho > 0 and pval < 0.05 else
                                            "**refuted**" if rho < 0 and pval < 0.05 else "not confirmed") + " |")
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        from fpe_lab.checkpoint import atomic_write_text

        args.write.mkdir(parents=True, exist_ok=True)
        seeds = next(iter(plans.values())).seeds
        atomic_write_text(args.write / "verdicts.md", f"# Verdicts by the registered rule ({', '.join(summaries)}; "
                          f"{len(seeds)} seeds)\n\nMade by `python studies/finetune_protocol/verdicts.py`; the rule: "
                          "its docstring and full_design.md.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
