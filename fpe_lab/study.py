r"""A study: the grid of toy2d runs over regularizer weights λ and seeds, and its summary table.

Each (λ, seed) is one ordinary toy2d run folder under the study folder (named by
:func:`fpe_lab.commands.toy2d.run_dir_name`): λ = 0 is plain DSM (``reg=none``), λ > 0 is
DSM + λ·E w(t)‖R_θ‖². A run whose folder already holds ``metrics.json`` for the same config is
skipped, an interrupted one (config and checkpoint, no metrics) continues from its checkpoint, so a
study can be stopped and restarted at any point. The summary gives mean ± std over seeds of the
headline metrics per λ, as CSV and Markdown.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from fpe_lab.checkpoint import CONFIG_NAME, atomic_write_text, read_config
from fpe_lab.config import Regularizer, Toy2dConfig

__all__ = [
    "METRICS_NAME",
    "SUMMARY_METRICS",
    "StudyPlan",
    "RunFn",
    "is_finished",
    "run_study",
    "summarize",
    "write_summary",
]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"

# (column name, path into metrics.json): the headline numbers of every run.
SUMMARY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fpe_residual", ("mean", "fpe_residual")),
    ("fpe_residual_rel", ("mean", "fpe_residual_rel")),
    ("score_error", ("mean", "score_error")),
    ("score_error_rel", ("mean", "score_error_rel")),
    ("jacobian_asymmetry_rel", ("mean", "jacobian_asymmetry_rel")),
    ("curl_abs", ("mean", "curl_abs")),
    ("nll_model_nats", ("nll", "model_nats")),
    ("nll_true_nats", ("nll", "true_nats")),
    ("nll_gap_nats", ("nll", "gap_nats")),
    ("sw_sde_vs_data", ("samples", "sliced_wasserstein", "sde_vs_data")),
    ("sw_ode_vs_data", ("samples", "sliced_wasserstein", "ode_vs_data")),
    ("sw_floor", ("samples", "sliced_wasserstein", "floor")),
    ("mmd2_sde_vs_data", ("samples", "mmd2", "sde_vs_data")),
)

RunFn = Callable[[Toy2dConfig, Path], Path]
"""``run_one(config, out) -> run_dir``: train and evaluate one config in ``out`` (resuming a partial
run in its folder), e.g. :func:`fpe_lab.commands.toy2d.run_toy2d` with ``resume=True``."""


@dataclass(frozen=True)
class StudyPlan:
    """The grid λ × seeds around a base config (all other settings shared).

    Args:
        base: the toy2d config whose data, SDE, steps, ... every run uses.
        lams: regularizer weights, each >= 0, no repeats (0 = plain DSM).
        seeds: seeds, each >= 0, no repeats.
    """

    base: Toy2dConfig
    lams: tuple[float, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        lams, seeds = tuple(self.lams), tuple(self.seeds)
        if not lams or any(not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) for v in lams):
            raise ValueError(f"lams must be a nonempty list of finite numbers >= 0; got {list(lams)!r}")
        if len(set(lams)) != len(lams):
            raise ValueError(f"lams must not repeat a value; got {list(lams)!r}")
        if not seeds or any(not (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in seeds):
            raise ValueError(f"seeds must be a nonempty list of ints >= 0; got {list(seeds)!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must not repeat a value; got {list(seeds)!r}")
        object.__setattr__(self, "lams", tuple(float(v) for v in lams))
        object.__setattr__(self, "seeds", seeds)

    def configs(self) -> list[Toy2dConfig]:
        """One config per (λ, seed), λ-major: reg=none for λ = 0 (its ``lam`` is kept but unused)."""
        out = []
        for lam in self.lams:
            reg = Regularizer.NONE if lam == 0 else Regularizer.FPE
            for seed in self.seeds:
                out.append(self.base.replace(reg=reg, lam=lam if lam > 0 else self.base.lam, seed=seed))
        return out


def is_finished(run_dir: Path, config: Toy2dConfig) -> bool:
    """True if ``run_dir`` holds metrics.json and the same config (then the run is skipped).

    A folder holding another config is an error (ValueError naming it), never silently reused."""
    if not (run_dir / CONFIG_NAME).is_file():
        return False
    saved = read_config(run_dir)
    if saved != config.to_dict():
        diff = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
        raise ValueError(f"run folder {run_dir} holds a different config (keys {diff}); move it away or use another --out")
    return (run_dir / METRICS_NAME).is_file()


def run_study(plan: StudyPlan, out: Path, run_one: RunFn, run_dir_name: Callable[[Toy2dConfig], str],
              progress: bool = True) -> list[Path]:
    """Run every (λ, seed) of ``plan`` under ``out`` that is not finished; returns all run folders.

    One progress bar over the runs (skipped runs count as done at once); the runs themselves are
    quiet. ``run_dir_name(config)`` must be the folder name ``run_one`` uses.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder; {out} is a file")
    configs = plan.configs()
    dirs = [out / run_dir_name(c) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two runs of the study map to the same folder; run_dir_name must include λ and seed")
    todo = [(c, d) for c, d in zip(configs, dirs) if not is_finished(d, c)]
    log.info("study: %d runs, %d finished, %d to do, in %s", len(configs), len(configs) - len(todo), len(todo), out)
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="study", disable=not progress,
               dynamic_ncols=True)
    try:
        for config, run_dir in todo:
            bar.set_postfix_str(f"λ={config.lam if config.reg is Regularizer.FPE else 0:g} seed={config.seed}")
            got = Path(run_one(config, out))
            if got.resolve() != run_dir.resolve():
                raise ValueError(f"run_one wrote {got}, expected {run_dir}")
            bar.update(1)
    finally:
        bar.close()
    return dirs


def _lookup(metrics: dict, path: tuple[str, ...]) -> float | None:
    v = metrics
    for key in path:
        if not isinstance(v, dict) or key not in v:
            return None
        v = v[key]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(run_dirs: Sequence[Path]) -> list[dict]:
    """Mean and sample std over seeds per λ of :data:`SUMMARY_METRICS`.

    Returns rows {"lam", "n_runs", "<metric>_mean", "<metric>_std", ...} sorted by λ (λ = 0 is DSM);
    a metric absent from a run (e.g. NLL disabled) is left out of its mean; std is NaN-free: 0 for one run.
    """
    groups: dict[float, list[dict]] = {}
    for d in run_dirs:
        d = Path(d)
        cfg = Toy2dConfig.from_dict(read_config(d))
        path = d / METRICS_NAME
        if not path.is_file():
            raise ValueError(f"run folder {d} is not finished: no {METRICS_NAME}")
        metrics = json.loads(path.read_text(encoding="utf-8"))
        lam = 0.0 if cfg.reg is Regularizer.NONE else float(cfg.lam)
        groups.setdefault(lam, []).append(metrics)
    rows = []
    for lam in sorted(groups):
        row: dict = {"lam": lam, "n_runs": len(groups[lam])}
        for name, path in SUMMARY_METRICS:
            vals = [v for v in (_lookup(m, path) for m in groups[lam]) if v is not None]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"] = mean, std, len(vals)
        rows.append(row)
    return rows


def write_summary(rows: list[dict], out: Path, stem: str = "summary") -> tuple[Path, Path]:
    """Write ``out/stem.csv`` (one column per mean and std) and ``out/stem.md`` (mean ± std), atomically."""
    names = [name for name, _ in SUMMARY_METRICS if any(f"{name}_mean" in r for r in rows)]
    header = ["lam", "method", "n_runs"] + [f"{n}_{k}" for n in names for k in ("mean", "std")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        method = "DSM" if r["lam"] == 0 else "DSM+FPE"
        w.writerow([f"{r['lam']:g}", method, r["n_runs"]]
                   + [f"{r[f'{n}_{k}']:.6g}" if f"{n}_{k}" in r else "" for n in names for k in ("mean", "std")])
    csv_path, md_path = Path(out) / f"{stem}.csv", Path(out) / f"{stem}.md"
    atomic_write_text(csv_path, buf.getvalue())
    lines = ["| λ | method | runs | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = [f"{r[f'{n}_mean']:.4g} ± {r[f'{n}_std']:.2g}" if f"{n}_mean" in r else "—" for n in names]
        lines.append(f"| {r['lam']:g} | {'DSM' if r['lam'] == 0 else 'DSM+FPE'} | {r['n_runs']} | " + " | ".join(cells) + " |")
    atomic_write_text(md_path, "\n".join(lines) + "\n\nmean ± sample std over seeds; lower is better for every column "
                      "except nll_true_nats (the truth) and sw_floor (the distance of two exact sample sets).\n")
    return csv_path, md_path
