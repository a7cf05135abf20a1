"""The bad inputs tried against every command, each with its one-line message and exit code.

Contract: bad input → exactly one line ``error: …`` naming the flag, file or value, exit 2; environment
failures → one ``error:`` line, exit 1; nothing written by a command that fails before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpe_lab import run as cli

FAST = ["--steps", "2", "--width", "8", "--depth", "1", "--eval-points", "4", "--eval-nll-points", "0",
        "--eval-samples", "0", "--eval-times", "0.5"]

# (id, argv, message fragment, exit code); "{tmp}" is the test's temporary folder, "{file}" a file in it
CASES: list[tuple[str, list[str], str, int]] = [
    # --- toy2d: values of the configuration
    ("eps-zero", ["toy2d", "--eps", "0"], "eps must be a finite number in (0, 0.5]; got 0.0", 2),
    ("eps-big", ["toy2d", "--eps", "0.7"], "eps must be a finite number in (0, 0.5]; got 0.7", 2),
    ("eps-below-float32", ["toy2d", "--eps", "1e-9"], "eps must be >= 1e-06", 2),
    ("eps-nan", ["toy2d", "--eps", "nan"], "eps must be a finite number", 2),
    ("eps-text", ["toy2d", "--eps", "small"], "argument --eps: invalid float value: 'small'", 2),
    ("width-zero", ["toy2d", "--width", "0"], "width must be an integer in [1, 65536]; got 0", 2),
    ("depth-negative", ["toy2d", "--depth", "-1"], "depth must be an integer in [1, 1024]; got -1", 2),
    ("n-freq-negative", ["toy2d", "--n-freq", "-1"], "n_freq must be an integer in [0, 1024]; got -1", 2),
    ("lam-negative", ["toy2d", "--lam", "-1"], "lam must be a finite number in [0, inf]; got -1.0", 2),
    ("lam-inf", ["toy2d", "--lam", "inf"], "lam must be a finite number", 2),
    ("reg-unknown", ["toy2d", "--reg", "l2"], "reg must be one of ['none', 'fpe', 'conservative', 'hodsm']", 2),
    ("reg-without-lam", ["toy2d", "--reg", "fpe", "--lam", "0"], "a regularizer needs lam > 0", 2),
    ("fpe-weighting", ["toy2d", "--fpe-weighting", "sigma"], "argument --fpe-weighting: invalid choice", 2),
    ("fpe-points", ["toy2d", "--fpe-points", "all"], "argument --fpe-points: invalid choice", 2),
    ("fpe-estimator", ["toy2d", "--fpe-estimator", "biased"], "argument --fpe-estimator: invalid choice", 2),
    ("dsm-weighting", ["toy2d", "--dsm-weighting", "g2"], "argument --dsm-weighting: invalid choice", 2),
    ("time-sampling", ["toy2d", "--time-sampling", "log"], "argument --time-sampling: invalid choice", 2),
    ("stiff-sde", ["toy2d", "--beta-min", "1e5", "--beta-max", "1e6"],
     "beta_min must be a finite number in (0, 1000]; got 100000.0", 2),  # trained, then hung in the PF-ODE (0.2)
    ("stiff-beta-max", ["toy2d", "--beta-max", "1e4"], "beta_max must be a finite number in [0.1, 1000]; got 10000.0", 2),
    ("steps-zero", ["toy2d", "--steps", "0"], "steps must be an integer in [1, 1000000000]; got 0", 2),
    ("steps-text", ["toy2d", "--steps", "many"], "argument --steps: invalid int value: 'many'", 2),
    ("steps-float", ["toy2d", "--steps", "2.5"], "argument --steps: invalid int value: '2.5'", 2),
    ("batch-zero", ["toy2d", "--batch", "0"], "batch must be an integer in [1, 10000000]; got 0", 2),
    ("lr-zero", ["toy2d", "--lr", "0"], "lr must be a finite number in (0, 10]; got 0.0", 2),
    ("lr-huge", ["toy2d", "--lr", "100"], "lr must be a finite number in (0, 10]; got 100.0", 2),
    ("ema-one", ["toy2d", "--ema-decay", "1"], "ema_decay must be a finite number in [0, 1); got 1.0", 2),
    ("grad-clip-zero", ["toy2d", "--grad-clip", "0"], "grad_clip must be a finite number in (0, inf]", 2),
    ("ckpt-every-zero", ["toy2d", "--ckpt-every", "0"], "ckpt_every must be an integer >= 1; got 0", 2),
    ("keep-negative", ["toy2d", "--keep", "-1"], "keep must be an integer >= 0; got -1", 2),
    ("seed-negative", ["toy2d", "--seed", "-1"], "seed must be an integer in [0, ", 2),
    ("device-unknown", ["toy2d", "--device", "tpu"], "argument --device: invalid choice: 'tpu'", 2),
    ("threads-zero", ["toy2d", "--threads", "0"], "threads must be an integer in [1, 1024]; got 0", 2),
    ("eval-time-zero", ["toy2d", "--eval-times", "0"], "eval times must be a nonempty list of numbers in (0, 1]", 2),
    ("eval-time-two", ["toy2d", "--eval-times", "0.5", "2"], "eval times must be a nonempty list", 2),
    ("eval-time-below-eps", ["toy2d", "--eval-times", "1e-4"], "eval times must lie in [eps, 1] = [0.001, 1]", 2),
    ("eval-points-one", ["toy2d", "--eval-points", "1"], "eval_points must be an integer in [2, 10000000]; got 1", 2),
    ("eval-samples-one", ["toy2d", "--eval-samples", "1"], "eval_samples must be 0 (skip) or >= 2; got 1", 2),
    ("eval-rtol-zero", ["toy2d", "--eval-rtol", "0"], "eval_rtol must be a finite number in (0, 1)", 2),
    ("eval-repeats-zero", ["toy2d", "--eval-repeats", "0"], "eval_repeats must be an integer in [1, 100]", 2),
    ("eval-probes-one", ["toy2d", "--eval-probes", "1"], "eval_probes must be an integer in [2, 1024]", 2),
    ("eval-seed-negative", ["toy2d", "--eval-seed", "-3"], "eval_seed must be an integer in [0, 4611686018427387904]; got -3", 2),
    ("fpe-batch-zero", ["toy2d", "--reg-batch", "0"], "reg_batch must be an integer >= 1; got 0", 2),
    ("fpe-batch-too-big", ["toy2d", "--reg-batch", "1000"], "reg_batch must be <= batch (256); got 1000", 2),
    ("probes-zero", ["toy2d", "--probes", "0"], "probes must be an integer in [1, 1024]; got 0", 2),
    ("hodsm-order", ["toy2d", "--reg", "hodsm", "--hodsm-order", "4"], "hodsm order must be 2 or 3", 2),
    ("fd-step-zero", ["toy2d", "--fpe-fd-step", "0"], "fpe fd_step must be a number in (0, 0.5); got 0.0", 2),
    ("jet-with-hutchinson", ["toy2d", "--divergence", "hutchinson"], "use --fpe-residual-path generic", 2),
    ("jet-with-fd", ["toy2d", "--fpe-dt", "fd"], "use --fpe-residual-path generic", 2),
    ("hflip-points", ["toy2d", "--hflip"], "hflip applies to real images only", 2),
    ("beta-min-zero", ["toy2d", "--beta-min", "0"], "beta_min must be a finite number in (0, 1000]", 2),
    ("beta-max-below-min", ["toy2d", "--beta-max", "0.05"], "beta_max must be a finite number in [0.1, 1000]", 2),
    ("sigma-max-below-min", ["toy2d", "--sigma-max", "0.001"], "sigma_max must be a finite number in (0.01, inf]", 2),
    ("dropout-one", ["toy2d", "--dropout", "1.5"], "dropout must be a finite number in [0, 1)", 2),
    ("width-none-text", ["toy2d", "--width", "wide"], "argument --width: invalid int value: 'wide'", 2),
    ("data-unknown", ["toy2d", "--data", "mnist"], "argument --data: invalid choice: 'mnist'", 2),
    ("sde-unknown", ["toy2d", "--sde", "ou"], "argument --sde: invalid choice: 'ou'", 2),
    ("unknown-flag", ["toy2d", "--learning-rate", "1"], "unrecognized arguments: --learning-rate 1", 2),
    ("cuda-missing", ["toy2d", "--device", "cuda"], "CUDA is not available", 2),
    ("bf16-on-cpu", ["toy2d", "--device", "cpu", "--bf16", *FAST], "bf16 needs CUDA", 2),
    # --- files
    ("config-missing", ["toy2d", "--config", "{tmp}/none.json"], "--config {tmp}/none.json: cannot read it", 2),
    ("config-not-json", ["toy2d", "--config", "{file}"], "config is not valid JSON", 2),
    ("config-unknown-key", ["toy2d", "--config", "{tmp}/unknown.json"], "unknown key(s) 'optim.epochs'", 2),
    ("config-bad-type", ["toy2d", "--config", "{tmp}/badtype.json"], "sde.kind must be one of", 2),
    ("config-bad-value", ["toy2d", "--config", "{tmp}/badvalue.json"], "steps must be an integer in [1, 1000000000]; got -5", 2),
    ("init-from-missing", ["toy2d", *FAST, "--init-from", "{tmp}/nothing"], "--init-from {tmp}/nothing: no checkpoint", 2),
    ("init-from-not-a-checkpoint", ["toy2d", *FAST, "--init-from", "{file}"], "cannot read checkpoint", 2),
    ("out-is-a-file", ["toy2d", *FAST, "--out", "{file}"], "is a file, not a folder", 1),
    # --- images
    ("cifar-missing-dir", ["cifar10", "--data-dir", "{tmp}/nothing", *FAST[:2]], "{tmp}/nothing", 2),
    ("cifar-jet", ["cifar10", "--fpe-residual-path", "jet"], "use --fpe-residual-path generic", 2),
    ("cifar-jet-exact", ["cifar10", "--fpe-residual-path", "jet", "--divergence", "exact"], "residual_path jet needs the MLP", 2),
    ("digits-width-groups", ["digits", *FAST, "--width", "6"], "num_groups", 2),
    ("digits-hutchinson-zero-probes", ["digits", "--probes", "0"], "probes must be an integer in [1, 1024]", 2),
    # --- eval
    ("eval-missing", ["eval", "{tmp}/nothing"], "is not a run folder (no config.json)", 2),
    ("eval-not-a-run", ["eval", "{tmp}"], "is not a run folder (no config.json)", 2),
    ("eval-bad-times", ["eval", "{tmp}", "--eval-times", "3"], "is not a run folder", 2),
    # --- study
    ("study-unknown-field", ["study", "toy2d", "--grid", "alpha=1,2"], "'alpha' is not a configuration field", 2),
    ("study-bad-value", ["study", "toy2d", "--grid", "lam=0.1,big"], "'big' is not a number", 2),
    ("study-bad-choice", ["study", "toy2d", "--grid", "reg=none,l1"], "reg must be one of", 2),
    ("study-repeated-field", ["study", "toy2d", "--grid", "lam=0.1", "lam=0.2"], "names 'lam' twice", 2),
    ("study-no-equals", ["study", "toy2d", "--grid", "lam"], "expected FIELD=V1,V2", 2),
    ("study-arm-two-values", ["study", "toy2d", "--arm", "lam=0.1,0.2"], "one value each", 2),
    ("study-seeds-zero", ["study", "toy2d", "--seeds", "0"], "--seeds must be in [1, 1000]; got 0", 2),
    ("study-jobs-zero", ["study", "toy2d", "--jobs", "0"], "--jobs must be in [1, 64]; got 0", 2),
    ("study-pretrain-zero", ["study", "toy2d", "--pretrain-steps", "0"], "--pretrain-steps must be in [1, ", 2),
    ("study-bad-preset", ["study", "mnist"], "argument preset: invalid choice: 'mnist'", 2),
    ("study-bad-lam", ["study", "toy2d", "--grid", "lam=-1"], "lam must be a finite number", 2),
    ("study-grid-steps", ["study", "toy2d", "--grid", "steps=10,20", "--dry-run"], "steps is not an arm field", 2),
    ("study-grid-seed", ["study", "toy2d", "--grid", "seed=1,2", "--dry-run"], "the seed is not an arm field", 2),
    ("study-grid-threads", ["study", "toy2d", "--grid", "threads=1,2", "--dry-run"], "threads is not an arm field", 2),
    ("study-grid-device", ["study", "toy2d", "--grid", "device=cpu,auto", "--dry-run"], "device is not an arm field",
     2),
    ("study-grid-eval", ["study", "toy2d", "--grid", "eval_points=8,16", "--dry-run"],
     "evaluation settings are not arm fields", 2),
    ("study-arm-steps", ["study", "toy2d", "--arm", "steps=10", "--dry-run"], "steps is not an arm field", 2),
    ("study-too-many-runs", ["study", "toy2d", "--grid", "lam=" + ",".join(f"{k / 1000:g}" for k in range(1, 51)),
                             "eps=" + ",".join(f"{k / 1e4:g}" for k in range(1, 21)), "--dry-run"],
     "at most 1000 runs", 2),
    ("study-init-from-pretrain", ["study", "toy2d", "--init-from", "{tmp}", "--pretrain-steps", "2", "--dry-run"],
     "--init-from and --pretrain-steps exclude each other", 2),
    # --- no abbreviated flags (--seed is not --seeds, --ste not --steps)
    ("abbrev-study-seed", ["study", "toy2d", "--seed", "3", "--dry-run"], "unrecognized arguments: --seed 3", 2),
    ("abbrev-train", ["toy2d", "--ste", "4", "--eps", "2"], "unrecognized arguments: --ste 4", 2),
    ("abbrev-eval", ["eval", "{tmp}", "--eval-time", "0.2"], "unrecognized arguments: --eval-time 0.2", 2),
    ("abbrev-top-level", ["--deb", "toy2d", "--eps", "2"], "unrecognized arguments: --deb", 2),
    # --- groundtruth and the top level
    ("groundtruth-times", ["groundtruth", "--times", "0.5", "0.1"], "--times", 2),
    ("groundtruth-grid", ["groundtruth", "--grid", "1"], "--grid", 2),
    ("no-command", [], "the following arguments are required: COMMAND", 2),
    ("unknown-command", ["train"], "argument COMMAND: invalid choice: 'train'", 2),
    ("top-level-flag", ["--verbose", "toy2d"], "unrecognized arguments: --verbose", 2),
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "plain.txt").write_text("not json, not a checkpoint\n")
    (tmp_path / "unknown.json").write_text(json.dumps({"optim": {"epochs": 3}}))
    (tmp_path / "badtype.json").write_text(json.dumps({"sde": {"kind": 3}}))
    (tmp_path / "badvalue.json").write_text(json.dumps({"optim": {"steps": -5}}))
    return {"tmp": str(tmp_path), "file": str(tmp_path / "plain.txt")}


def test_at_least_sixty_bad_inputs_are_listed():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, message, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(name, argv, message, code, files, capsys, monkeypatch, tmp_path):
    if name == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if name.startswith("digits") or name == "groundtruth-grid":
        pytest.importorskip("sklearn") if name.startswith("digits") else None
    monkeypatch.chdir(tmp_path)  # a default --out (runs/) lands here, where it is checked below
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(**files) for a in argv]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**files) in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no runs/ folder
