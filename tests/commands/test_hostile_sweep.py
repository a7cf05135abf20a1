"""A hostile sweep of every setting: each flag of the run configuration (``fpe_lab.config.leaves()``) and the numeric
and path flags of the other commands, given values chosen by the flag's type, through the CLI in-process.

Counts: 879 cases, 751 refused, 128 accepted, 0 BROKEN. Before the fixes made with this sweep 63 were BROKEN (702
refused, 114 accepted): counts beyond int64 accepted (--width, --depth, --n-freq, --batch, the evaluation's counts;
audit's counts and --seed; the figures' grids), a traceback from audit's ``1`` + 400 zeros, a non-finite or
non-positive figures ``--lam`` accepted, a documented ``none`` refused (--eval-ode, --eval-times, --data-shape), and
empty paths read as the current folder (``groundtruth --out ''`` solved and wrote there).

Each case runs the real CLI (``fpe_lab.run.main``, ``fpe_lab.figures.__main__.main``) where the values are checked
and nothing heavy runs: ``study PRESET --dry-run`` for the configuration's flags (every run configuration built and
validated, nothing trained; ``--seed``, which a study does not take, through ``toy2d --dry-run``), and for the other
commands an input that stops them right after their argument checks (a MODEL that does not exist, an output that
exists, a run folder without a checkpoint): reaching that stop means the value was accepted. The verdict of a case:

- refused: exit 2 and exactly one stderr line, starting ``error:``, that names the flag (or its field) or the value;
- accepted: exit 0 (or the command's stop above) where the value is valid for the setting, judged by its documented
  range (``SPEC``: a new configuration field fails ``test_every_leaf_has_a_range`` until its range is written here),
  with the configuration it gives (``toy2d --dry-run``) holding that value and no NaN or infinity;
- BROKEN: anything else: an exception, another exit code, several lines, a refusal of a valid value, an error that
  names neither flag nor value, an invalid value accepted, or a file left behind.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fpe_lab import run as cli
from fpe_lab.config import Leaf, RunConfig, leaves, toy2d
from fpe_lab.figures import __main__ as figures_cli
from fpe_lab.settings import strip_optional

BAD = object()
"""What a text is when the flag's type cannot read it (``1e3`` for an integer, ``abc`` for a number)."""

INTS = ("-1", "0", "1", "1e3", "2.5", "nan", "99999999999999999999", "abc", "")
FLOATS = ("nan", "inf", "-inf", "-1", "0", "1e309", "abc", "")
NONES = ("none", "None")
HUGE = "1" + "0" * 400  # an integer no float holds: float(HUGE) overflows
PATHS = ("",)

# Ranges of the values each setting takes; MAX_* are the caps this sweep introduced (values beyond int64 overflowed
# inside torch after training had started: an "unexpected" exit 1, or an error naming nothing).
MAX_SEED = 2**62
MAX_COUNT = 10**7  # batch, evaluation points and chunks
MAX_WIDTH = 2**16
MAX_DEPTH = 1024
MAX_FREQ = 1024


def ints(lo: int, hi: float = math.inf, none: bool = False, also: tuple[int, ...] = ()) -> Callable[[Any], bool]:
    return lambda v: (v is None and none) or (isinstance(v, int) and (lo <= v <= hi or v in also))


def floats(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
           none: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if v is None:
            return none
        return (isinstance(v, float) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (v < hi if hi_open else v <= hi))

    return ok


def times(lo: float, lo_open: bool = True, none: bool = False, ordered: bool = True) -> Callable[[Any], bool]:
    """A nonempty list of numbers in [lo, 1] (or (lo, 1]), increasing without repeats where ``ordered``."""

    def ok(v: Any) -> bool:
        if v is None:
            return none
        inside = all(math.isfinite(t) and (t > lo if lo_open else t >= lo) and t <= 1 for t in v)
        return bool(v) and inside and (not ordered or list(v) == sorted(set(v)))

    return ok


def shape(v: Any) -> bool:
    """data_shape: none, or 1 to 3 positive integers, at most 3·64·64 values, C,H,W square."""
    if v is None:
        return True
    return (1 <= len(v) <= 3 and all(n >= 1 for n in v) and math.prod(v) <= 3 * 64 * 64
            and (len(v) < 3 or v[1] == v[2]))


def anything(v: Any) -> bool:
    return True


def nothing(v: Any) -> bool:
    return False


def path(v: Any) -> bool:
    """A path flag: any nonempty text (existence is checked where the path is used)."""
    return v is None or v != ""


# The valid values of every configuration flag in the toy2d preset (gmm, VP, MLP, fpe regularizer with lam 0.1,
# batch 256, eval times from 0.02), from the field's help and the checks it documents; CONTEXT sets the flags
# that make a setting act (the mixture's fields, a regularizer's options).
SPEC: dict[str, Callable[[Any], bool]] = {
    "data": anything, "data-dir": path, "hflip": lambda v: v is False,  # hflip: real images only
    "data-dim": ints(1, 4096), "components": ints(1, 64), "data-shape": shape, "mixture-rank": ints(0, 64),
    "sde": anything,
    "beta-min": floats(0, 20, lo_open=True),  # (0, 1000] and <= beta_max = 20
    "beta-max": floats(0.1, 1000),  # >= beta_min = 0.1
    "sigma-min": floats(0, 50, lo_open=True, hi_open=True),  # < sigma_max = 50
    "sigma-max": floats(0.01, lo_open=True),
    "width": ints(1, MAX_WIDTH, none=True), "depth": ints(1, MAX_DEPTH, none=True), "n-freq": ints(0, MAX_FREQ),
    "model": anything, "dropout": floats(0, 1, hi_open=True, none=True),
    "dsm-weighting": anything, "eps": floats(1e-6, 0.02),  # (0, 0.5], >= 1e-6 and <= the first eval time
    "time-sampling": anything, "reg": lambda v: v in ("none", "fpe", "conservative", "hodsm"), "lam": floats(0),
    "reg-batch": ints(1, 256, none=True), "per-dim": anything, "divergence": anything, "probes": ints(1, 1024),
    "probe": anything, "fpe-weighting": anything, "fpe-points": anything, "fpe-estimator": anything, "fpe-dt": anything,
    "fpe-fd-step": floats(0, 0.5, lo_open=True, hi_open=True), "fpe-residual-path": anything,
    "conservative-weighting": anything, "hodsm-order": lambda v: v in (2, 3),
    "steps": ints(1, 10**9), "batch": ints(1, MAX_COUNT), "lr": floats(0, 10, lo_open=True),
    "ema-decay": floats(0, 1, hi_open=True), "grad-clip": floats(0, lo_open=True, none=True),
    "ckpt-every": ints(1), "keep": ints(0),  # harmless when large: "never" and "all"
    "init-from": path, "init-state": anything, "init-weights": anything, "bf16": anything,
    "eval-times": times(0.001, lo_open=False, none=True),  # (0, 1], increasing, >= eps
    "eval-points": ints(2, MAX_COUNT, none=True), "eval-nll-points": ints(0, MAX_COUNT, none=True),
    "eval-samples": ints(2, MAX_COUNT, also=(0,)), "eval-rtol": floats(0, 1, lo_open=True, hi_open=True, none=True),
    "eval-repeats": ints(1, 100, none=True), "eval-ode": anything, "eval-scale": anything,
    "eval-batch": ints(1, MAX_COUNT), "eval-probes": ints(2, 1024), "eval-seed": ints(0, MAX_SEED, none=True),
    "eval-gap-grid": ints(16, 512, also=(0,)), "seed": ints(0, MAX_SEED), "device": anything,
    "threads": ints(1, 1024), "plugin": nothing,  # none of the plug-in names tried defines a regularizer
}
CONTEXT: dict[str, tuple[str, ...]] = {
    **{f: ("--data", "mixture") for f in ("data-dim", "components", "mixture-rank")},
    "data-shape": ("--data", "mixture", "--reg", "none"),  # the fpe regularizer's jet takes D <= 8 only
    "conservative-weighting": ("--reg", "conservative"), "hodsm-order": ("--reg", "hodsm"),
}
IMAGE_SPEC: dict[str, Callable[[Any], bool]] = {  # digits: the settings that act on images only
    "hflip": anything, "model": anything, "dropout": floats(0, 1, hi_open=True, none=True), "per-dim": anything,
    "eval-scale": anything, "eval-ode": anything, "eval-times": times(0.0, none=True),
    "eval-probes": ints(2, 1024), "eval-batch": ints(1, MAX_COUNT),
}
BOOL_FORMS = ("--{}=true", "--{} abc", "--no-{}", "--{}")


@dataclass(frozen=True)
class Case:
    """One command line and what it must do. ``{tmp}`` in argv is the test's folder. ``stop``: the error that
    means the arguments were accepted (None: exit 0). ``leaf``/``value``/``context``: the configuration value to
    find in ``toy2d --dry-run``'s output when accepted."""

    id: str
    argv: tuple[str, ...]
    valid: bool
    names: tuple[str, ...]
    stop: str | None = None
    figures: bool = False
    leaf: Leaf | None = None
    value: Any = None
    context: tuple[str, ...] = ()
    preset: str = "toy2d"


# ---------------------------------------------------------------------- values by type
def _read(kind: Any, optional: bool, text: str) -> Any:
    """The value the CLI reads from ``text`` for a flag of type ``kind`` (BAD where it cannot)."""
    if optional and text.lower() == "none":
        return None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return next((m for m in kind if m.value == text), BAD)
    try:
        return kind(text)
    except ValueError:
        return BAD


def _read_list(item: Any, optional: bool, words: tuple[str, ...]) -> Any:
    if optional and len(words) == 1 and words[0].lower() == "none":
        return None
    values = [_read(item, False, part) for word in words for part in word.split(",") if part]
    return BAD if any(v is BAD for v in values) else tuple(values)


def _words(leaf: Leaf) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(argv words, the value they mean or BAD) for each hostile value of ``leaf``'s type."""
    kind, optional = strip_optional(leaf.kind)
    flag = f"--{leaf.flag}"
    nones = NONES if optional else ()
    if leaf.repeat:
        for text in ("", "no_such_module_xyz", "os", "a..b"):
            yield (f"{flag}={text}",), text
    elif kind is bool:
        for form in BOOL_FORMS:
            if form == "--{}" and leaf.flag == "bf16":
                continue  # whether CUDA is there decides
            words = tuple(form.format(leaf.flag).split(" "))
            yield words, (False if form.startswith("--no-") else True if form == "--{}" else BAD)
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        first = next(iter(kind)).value
        for text in ("bogus", "", first.swapcase(), *nones):
            yield (f"{flag}={text}",), _read(kind, optional, text)
    elif typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        lists = ([("0.5", "0.5"), ("0.5", "0.1"), ("-0.5",), ("1.5",), ("nan",), ("inf",), ("0",), ("",), ("0.1,0.5",)]
                 if item is float else
                 [("0",), ("-1",), ("",), ("2.5",), ("nan",), ("3,32",), ("3", "8", "8"), ("1,8,9",),
                  ("99999999999999999999",)])
        for words in [*lists, *((n,) for n in nones), ("0.5", "none")]:
            yield (flag, *words), _read_list(item, optional, words)
    else:
        texts = {int: INTS, float: FLOATS, str: ("", "bogus", "FPE")}[kind]
        for text in (*texts, *nones):
            yield (f"{flag}={text}",), _read(kind, optional, text)


def _names(leaf: Leaf) -> tuple[str, ...]:
    field = leaf.path[-1]
    return (leaf.flag, leaf.flag.replace("-", "_"), *((field,) if len(field) >= 4 else ()))


def _leaf_cases(leaf: Leaf, preset: str, spec: dict[str, Callable[[Any], bool]]) -> list[Case]:
    context = CONTEXT.get(leaf.flag, ()) if preset == "toy2d" else ()
    if leaf.flag == "seed":  # a study takes --seeds and --first-seed; the run's seed goes through training's dry run
        head: tuple[str, ...] = (preset, "--dry-run", "--out", "{tmp}/out")
    else:
        head = ("study", preset, "--dry-run", "--seeds", "1", "--out", "{tmp}/out")
    out = []
    for words, value in _words(leaf):
        valid = value is not BAD and spec[leaf.flag](value)
        out.append(Case(f"{preset} {' '.join(words)}", (*head, *context, *words), valid,
                        _names(leaf) + tuple(w for w in words if w.strip()), leaf=leaf, value=value,
                        context=context, preset=preset))
    return out


def _scalar_cases(name: str, prefix: tuple[str, ...], flag: str, texts: tuple[str, ...], kind: type,
                  ok: Callable[[Any], bool], stop: str | None = None, figures: bool = False) -> list[Case]:
    cases = []
    for text in texts:
        value = _read(kind, False, text)
        cases.append(Case(f"{name} --{flag}={'HUGE' if text == HUGE else text}", (*prefix, f"--{flag}={text}"),
                          value is not BAD and ok(value), (flag, flag.replace("-", "_"), *([text] if text else [])),
                          stop=stop, figures=figures))
    return cases


def _list_cases(name: str, prefix: tuple[str, ...], flag: str, lists: list[tuple[str, ...]], kind: type,
                ok: Callable[[Any], bool], stop: str | None = None, figures: bool = False) -> list[Case]:
    """A flag that takes several values (no comma lists)."""
    cases = []
    for words in lists:
        value = _read_list(kind, False, words)
        shown = " ".join("HUGE" if w == HUGE else repr(w) if not w else w for w in words)
        cases.append(Case(f"{name} --{flag} {shown}", (*prefix, f"--{flag}", *words),
                          value is not BAD and ok(value), (flag, flag.replace("-", "_"), *(w for w in words if w)),
                          stop=stop, figures=figures))
    return cases


# ---------------------------------------------------------------------- the cases, by group
def _groups() -> dict[str, list[Case]]:
    groups: dict[str, list[Case]] = {}
    all_leaves = list(leaves())
    for leaf in all_leaves:
        groups[f"toy2d--{leaf.flag}"] = _leaf_cases(leaf, "toy2d", SPEC)
    for leaf in all_leaves:
        if leaf.flag in IMAGE_SPEC:
            groups[f"digits--{leaf.flag}"] = _leaf_cases(leaf, "digits", IMAGE_SPEC)
    groups["cifar10--data-dir"] = [  # read at the dry run (the data enter the fingerprint by content)
        Case(f"cifar10 --data-dir={t}", ("study", "cifar10", "--dry-run", "--seeds", "1", "--out", "{tmp}/out",
                                         f"--data-dir={t}"), False, ("data-dir", "data_dir", *([t] if t else [])))
        for t in ("", "{tmp}/nothing", "none")]

    study = ("study", "toy2d", "--dry-run", "--out", "{tmp}/out")
    groups["study-counts"] = [
        *_scalar_cases("study", study, "seeds", (*INTS, HUGE), int, ints(1, 1000)),
        *_scalar_cases("study", study + ("--seeds", "1"), "first-seed", (*INTS, HUGE), int, ints(0, MAX_SEED)),
        *_scalar_cases("study", study + ("--seeds", "1"), "pretrain-steps", (*INTS, HUGE), int, ints(1, 10**9)),
        *_scalar_cases("study", study + ("--seeds", "1"), "jobs", (*INTS, HUGE), int, ints(1, 64)),
    ]
    groups["study-finetune-lr"] = _scalar_cases("study", study + ("--seeds", "1", "--pretrain-steps", "1"), "finetune-lr",
                                                FLOATS, float, floats(0, 10, lo_open=True))
    grid_items = ("lam=nan", "lam=inf", "eps=-inf", "eps=1e309", "width=99999999999999999999", "width=1e3",
                  "batch=99999999999999999999", "reg=FPE", "lam=0.1,0.1", "lam=", "lam=0.1,,0.2", "=0.1",
                  "data_shape=3,8,8", "eval_times=0.5", "hflip=yes")
    groups["study-grid"] = [Case(f"study --grid {g}", (*study, "--seeds", "1", "--grid", g), False,
                                 ("grid", *(p for p in re.split("[=,]", g) if p))) for g in grid_items]
    groups["paths"] = [
        Case("study --out ''", ("study", "toy2d", "--dry-run", "--seeds", "1", "--out", ""), False, ("out",)),
        Case("toy2d --out ''", ("toy2d", "--dry-run", "--out", ""), False, ("out",)),
        Case("toy2d --config ''", ("toy2d", "--dry-run", "--out", "{tmp}/out", "--config", ""), False, ("config",)),
        Case("eval ''", ("eval", ""), False, ("run_dir", "RUN_DIR")),
        Case("report ''", ("report", ""), False, ("study_dir", "STUDY_DIR")),
        Case("report missing", ("report", "{tmp}/nothing"), False, ("{tmp}/nothing",)),
        Case("report --out ''", ("report", "{tmp}/nothing", "--out", ""), False, ("out",)),
        Case("groundtruth --out ''", ("groundtruth", "--out", ""), False, ("out",)),
        Case("audit MODEL ''", ("audit", "", "--data", "moons", "--out", "{tmp}/audit"), False, ("MODEL", "model")),
        Case("audit --out ''", ("audit", "{tmp}/nothing", "--data", "moons", "--out", ""), False, ("out",)),
        Case("audit --data-dir ''", ("audit", "{tmp}/nothing", "--data", "moons", "--out", "{tmp}/audit",
                                     "--data-dir", ""), False, ("data-dir", "data_dir")),
        Case("figures RUN_DIR ''", ("",), False, ("RUN_DIR", "run_dir", "run folder"), figures=True),
        Case("figures --out ''", ("{tmp}/nothing", "--out", ""), False, ("out",), figures=True),
    ]

    # eval: a run folder with its config.json and no checkpoint; accepted flags stop at "no checkpoint"
    ev = ("eval", "{tmp}/run")
    for leaf in all_leaves:
        if leaf.path[0] == "eval" or leaf.flag == "device":
            groups[f"eval--{leaf.flag}"] = [
                Case(f"eval {' '.join(words)}", (*ev, *words), value is not BAD and SPEC[leaf.flag](value),
                     _names(leaf) + tuple(w for w in words if w.strip()), stop="has no checkpoint to evaluate")
                for words, value in _words(leaf)]

    # groundtruth: an output that exists stops it after every input check
    gt = ("groundtruth", "--out", "{tmp}/gt")
    stop = "solution.npz exists"
    gt_times = [("0.5", "0.5"), ("0.5", "0.1"), ("-0.5",), ("1.5",), ("nan",), ("inf",), ("",), ("0",), ("none",)]
    groups["groundtruth"] = [
        *_scalar_cases("groundtruth", gt, "grid", (*INTS, HUGE), int, ints(8, 4096), stop),
        *_scalar_cases("groundtruth", gt, "n-steps", (*INTS, HUGE), int, ints(1, 100000), stop),
        *_list_cases("groundtruth", gt, "times", gt_times, float, times(0.0, lo_open=False), stop),
        *_scalar_cases("groundtruth", gt, "data", ("bogus", "", "MOONS"), str, nothing, stop),
        *_scalar_cases("groundtruth", gt, "method", ("bogus", "", "AUTO"), str, nothing, stop),
    ]
    for leaf in all_leaves:
        if leaf.path[0] == "sde":
            groups[f"groundtruth--{leaf.flag}"] = [
                Case(f"groundtruth {' '.join(words)}", (*gt, *words), value is not BAD and SPEC[leaf.flag](value),
                     _names(leaf) + tuple(w for w in words if w.strip()), stop=stop) for words, value in _words(leaf)]

    # audit: a MODEL that does not exist stops it after every argument check
    au = ("audit", "{tmp}/nothing", "--data", "moons", "--out", "{tmp}/audit")
    stop = "is not a folder (expected a diffusers"
    audit_times = [("0.5", "0.5"), ("0.5", "0.1"), ("-0.5",), ("1.5",), ("nan",), ("inf",), ("",), ("0",),
                   ("1e-4",), ("0.01", "1")]
    groups["audit"] = [
        *_scalar_cases("audit", au, "points", (*INTS, HUGE), int, ints(1, MAX_COUNT), stop),
        *_scalar_cases("audit", au, "probes", (*INTS, HUGE), int, ints(1, 1024), stop),
        *_scalar_cases("audit", au, "batch", (*INTS, HUGE), int, ints(1, MAX_COUNT), stop),
        *_scalar_cases("audit", au, "seed", (*INTS, HUGE), int, ints(0, MAX_SEED), stop),
        *_scalar_cases("audit", au, "sample-steps", (*INTS, HUGE), int, ints(1, 10**6), stop),
        *_scalar_cases("audit", au, "eps", FLOATS, float, floats(0, 1, lo_open=True), stop),
        *_list_cases("audit", au, "times", audit_times, float, times(1e-3, lo_open=False), stop),
        *_scalar_cases("audit", au, "dtype", ("bogus", "", "FLOAT32"), str, nothing, stop),
        *_scalar_cases("audit", au, "device", ("bogus", "", "AUTO"), str, nothing, stop),
    ]

    # figures: a run folder that does not exist stops it after every option check
    fg = ("{tmp}/nothing", "--out", "{tmp}/figs")
    stop = "run folder {tmp}/nothing does not exist"
    fig_times = [("0.5", "0.5"), ("0.5", "0.1"), ("-0.5",), ("1.5",), ("nan",), ("inf",), ("",), ("0",)]
    groups["figures"] = [
        *_scalar_cases("figures", fg, "lam", (*FLOATS, "0.1"), float, floats(0, lo_open=True), stop, figures=True),
        *_scalar_cases("figures", fg, "field-grid", (*INTS, HUGE), int, ints(8, 4096), stop, figures=True),
        *_scalar_cases("figures", fg, "density-grid", (*INTS, HUGE), int, ints(8, 4096), stop, figures=True),
        *_list_cases("figures", fg, "field-times", fig_times, float, times(0.0, ordered=False), stop, figures=True),
        *_list_cases("figures", fg, "curl-times", fig_times, float, times(0.0, ordered=False), stop, figures=True),
        *_list_cases("figures", fg, "solver-grids", [("8", "16", "32"), ("8", "16"), ("16", "8", "32"), ("8", "8", "16"),
                                          ("8", "16", "99999999999999999999"), ("8", "16", HUGE), ("abc",), ("",)],
                     int, lambda v: len(v) >= 3 and ints(8, 4096)(max(v)) and min(v) >= 8 and list(v) == sorted(set(v)),
                     stop, figures=True),
    ]
    return groups


GROUPS = _groups()
ALL_CASES = [c for cases in GROUPS.values() for c in cases]


# ---------------------------------------------------------------------- running one case
def _invoke(case: Case, tmp: Path) -> tuple[int | str, str, str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code: int | str = (figures_cli.main if case.figures else cli.main)(argv)
        except SystemExit as e:  # argparse of python -m fpe_lab.figures exits; the process exits with it too
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - an uncaught exception is a verdict, not a crash of the sweep
            code = f"uncaught {type(e).__name__}: {e}"
    return code, err.getvalue(), out.getvalue()


def _files(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def _check_config(case: Case, tmp: Path) -> str | None:
    """For an accepted configuration value: the configuration training would use holds it, finite."""
    assert case.leaf is not None
    words = case.argv[case.argv.index("--out") + 2:] if case.argv[0] == "study" else case.argv[4:]
    code, err, out = _invoke(Case("check", (case.preset, "--dry-run", "--out", "{tmp}/out", *words), True, ()), tmp)
    if code != 0:
        return f"{case.preset} --dry-run refused what the study accepted: {code} {err.strip()}"
    text = out[:out.rindex("run folder:")]
    d = json.loads(text)
    if not _finite(d):
        return f"a non-finite number in the configuration: {text}"
    got = case.leaf.get(RunConfig.from_dict(d))
    if got != case.value:
        return f"the configuration holds {got!r}, not {case.value!r}"
    return None


def classify(case: Case, tmp: Path) -> tuple[str, str]:
    """("refused" | "accepted" | "BROKEN", what happened)."""
    (tmp / "run").mkdir(exist_ok=True)
    (tmp / "run" / "config.json").write_text(toy2d().to_json())
    (tmp / "run" / "run.lock").touch()  # what evaluating the folder leaves there by design (fpe_lab.runs)
    (tmp / "gt").mkdir(exist_ok=True)
    (tmp / "gt" / "solution.npz").write_bytes(b"")
    before = _files(tmp)
    code, err, _ = _invoke(case, tmp)
    lines = err.splitlines()
    left = sorted(_files(tmp) - before)
    if left:
        return "BROKEN", f"left behind {left} (exit {code}, {err.strip()!r})"
    if isinstance(code, str):
        return "BROKEN", code
    stop = case.stop.replace("{tmp}", str(tmp)) if case.stop else None
    accepted = code == 0 if stop is None else (code == 2 and len(lines) == 1 and stop in err)
    if accepted:
        if not case.valid:
            return "BROKEN", f"accepted an invalid value ({err.strip() or 'exit 0'})"
        if case.leaf is not None:
            problem = _check_config(case, tmp)
            if problem:
                return "BROKEN", problem
        return "accepted", ""
    if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err:
        return "BROKEN", f"exit {code}, stderr {err!r}"
    if case.valid:
        return "BROKEN", f"refused a valid value: {lines[0]}"
    names = [n.replace("{tmp}", str(tmp)) for n in case.names]
    if not any(n in lines[0] for n in names):
        return "BROKEN", f"the error names neither the flag nor the value ({names}): {lines[0]}"
    return "refused", lines[0]


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_hostile_value_is_refused_in_one_line_or_valid(group, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default output (runs/) would land here and be seen
    broken = []
    for case in GROUPS[group]:
        verdict, what = classify(case, tmp_path)
        if verdict == "BROKEN":
            broken.append(f"{case.id!r}: {what}")
    assert not broken, "\n".join(broken)


def test_every_leaf_has_a_range():
    flags = {leaf.flag for leaf in leaves()}
    assert flags <= set(SPEC), f"write the valid range of {sorted(flags - set(SPEC))} into SPEC"
    assert set(SPEC) <= flags, f"SPEC names flags that no longer exist: {sorted(set(SPEC) - flags)}"


def test_the_counts_in_the_docstring_hold():
    """With no BROKEN case (the test above), accepted = the cases whose value is valid, refused = the others."""
    total, valid = len(ALL_CASES), sum(c.valid for c in ALL_CASES)
    doc = __doc__ or ""
    assert f"{total} cases" in doc and f"{total - valid} refused" in doc and f"{valid} accepted" in doc, (
        total, total - valid, valid)
    assert len({c.id for c in ALL_CASES}) == total  # each case says something new


if __name__ == "__main__":  # the counts: python tests/commands/test_hostile_sweep.py
    import collections
    import os
    import tempfile

    counts: collections.Counter[str] = collections.Counter()
    for case in ALL_CASES:
        with tempfile.TemporaryDirectory() as d:
            os.chdir(d)
            verdict, what = classify(case, Path(d))
        counts[verdict] += 1
        if verdict == "BROKEN":
            print(f"BROKEN {case.id!r}: {what}")
    print(f"{len(ALL_CASES)} cases: {dict(counts)}; expected valid {sum(c.valid for c in ALL_CASES)}")
