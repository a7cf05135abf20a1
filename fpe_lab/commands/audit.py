"""``python -m fpe_lab.run audit MODEL --data DATA --out DIR``: audit a score model against the score
Fokker–Planck equation (:func:`fpe_lab.audit.audit`) at a grid of times.

MODEL is a diffusers ``UNet2DModel`` folder (an epsilon-, v- or sample-predicting network with any
diffusers beta schedule, read as the score −ε̂(x, t)/sigma(t) under the VP SDE of its own ᾱ table, network
timestep N t − 1: :mod:`fpe_lab.nets.diffusers_model`; needs ``pip install -e ".[audit]"``) or an fpe_lab
run folder (its EMA weights and SDE). DATA is ``cifar10`` (test split, ``--data-dir``),
``digits`` (test split), a 2-D toy set, or ``model``: samples of the model itself (reverse SDE from
the prior, ``--sample-steps`` Euler–Maruyama steps down to ``--eps``). ``--points`` data points per
time are drawn without replacement with ``--seed``, which also seeds the noise and the probes.

Writes ``DIR/audit.json`` (the report and how it was made; refuses to overwrite without
``--overwrite``) and ``DIR/audit.png`` (every per-t quantity against t), and logs a summary.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, cast

import torch

from fpe_lab.audit import DEFAULT_EPS, AuditReport, audit, default_times, report_figure
from fpe_lab.checkpoint import atomic_write_bytes, atomic_write_text
from fpe_lab.commands import CLIError, one_line_errors, path_arg, ranged
from fpe_lab.config import DeviceChoice
from fpe_lab.data.toy import TOY_NAMES
from fpe_lab.sde import LinearSDE

__all__ = ["add_parser", "read_audit", "AUDIT_NAME", "FIGURE_NAME", "DATA_CHOICES"]

log = logging.getLogger(__name__)

AUDIT_NAME = "audit.json"
FIGURE_NAME = "audit.png"
DATA_CHOICES: tuple[str, ...] = ("cifar10", "digits", *TOY_NAMES, "model")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Caps of the counts: beyond int64 they overflowed inside torch after the model had loaded (an "unexpected" exit 1)
MAX_COUNT = 10**7
MAX_SEED = 2**62
MAX_SAMPLE_STEPS = 10**6


def add_parser(subparsers) -> None:
    description = re.sub(r":\w+:`([^`]*)`", r"\1", (__doc__ or "").replace("``", ""))
    p = subparsers.add_parser(
        "audit", help="audit a pretrained score model (diffusers UNet2DModel or fpe_lab run) against the score FPE",
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --overwr is not --overwrite: a flag must be spelled out
    )
    p.add_argument("model", type=path_arg, metavar="MODEL",
                   help="a diffusers UNet2DModel folder or an fpe_lab run folder")
    p.add_argument("--data", required=True, choices=DATA_CHOICES,
                   help="data x0 to perturb: an image test split, a 2-D toy set, or 'model' (the model's own samples)")
    p.add_argument("--data-dir", type=path_arg, default=None,
                   help="cifar10: the cifar-10-batches-py folder or its parent")
    p.add_argument("--points", type=ranged(int, 1, MAX_COUNT), default=64,
                   help=f"data points per time, at most {MAX_COUNT} (default: %(default)s)")
    p.add_argument("--times", type=ranged(float, 0.0, 1.0, lo_open=True), nargs="+", default=None, metavar="T",
                   help="times in [eps, 1], increasing (default: 8 log-spaced from eps to 1)")
    p.add_argument("--probes", type=ranged(int, 1, 1024), default=2,
                   help="Rademacher probes per Hutchinson estimate when D > 16; exact below (default: %(default)s)")
    p.add_argument("--eps", type=ranged(float, 0.0, 1.0, lo_open=True), default=DEFAULT_EPS,
                   help="smallest time, and the end time of --data model sampling (default: %(default)s)")
    p.add_argument("--out", type=path_arg, required=True, help="output folder for audit.json and audit.png")
    p.add_argument("--batch", type=ranged(int, 1, MAX_COUNT), default=16,
                   help="points per chunk, for memory (default: %(default)s)")
    p.add_argument("--device", choices=[d.value for d in DeviceChoice], default=DeviceChoice.AUTO.value,
                   help="device; auto: cuda if available (default: %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the model and the derivatives (default: %(default)s)")
    p.add_argument("--seed", type=ranged(int, 0, MAX_SEED), default=0,
                   help="seed of the data subset, noise and probes (default: %(default)s)")
    p.add_argument("--sample-steps", type=ranged(int, 1, MAX_SAMPLE_STEPS), default=200,
                   help="--data model: reverse-SDE steps (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {AUDIT_NAME}")
    p.set_defaults(handler=_audit_command)
    one_line_errors(p)


# ---------------------------------------------------------------------- the model
def _load_model(
    path: Path, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, LinearSDE, tuple[int, ...], str]:
    """(score model, its SDE, the shape of one sample it takes, a description)."""
    from fpe_lab.nets import diffusers_model as dm

    if not path.is_dir():
        raise CLIError(
            f"MODEL {path} is not a folder (expected a diffusers UNet2DModel folder or an fpe_lab run folder)"
        )
    if dm.looks_like_diffusers(path):
        try:
            score = dm.load_diffusers_score(path, dtype=dtype, device=device)
        except (dm.MissingDiffusersError, dm.DiffusersModelError) as e:
            raise CLIError(str(e).splitlines()[0]) from None
        net = cast(dm.DiffusersEpsNet, score.net)  # what load_diffusers_score wraps
        described = f"diffusers UNet2DModel {path} ({net.schedule.prediction_type} prediction, {score.sde!r})"
        return score, score.sde, net.image_shape, described
    from fpe_lab import runs

    if (path / "config.json").is_file():
        try:
            run = runs.load(path)
            model = run.model(dtype=dtype, device=device)
        except (runs.RunError, ValueError, KeyError, FileNotFoundError) as e:
            raise CLIError(f"MODEL {path}: {str(e).splitlines()[0]}") from None
        return model, run.sde, tuple(run.config.data.shape), f"fpe_lab run {path} ({run.sde!r})"
    raise CLIError(
        f"MODEL {path} is neither an fpe_lab run folder (config.json + checkpoint.pt) "
        "nor a diffusers UNet2DModel folder "
        f"({dm.CONFIG_NAME} with \"_class_name\": \"UNet2DModel\" and {dm.SAFETENSORS_NAME} or {dm.BIN_NAME})"
    )


# ---------------------------------------------------------------------- the data
def _load_data(args: argparse.Namespace, model, sde: LinearSDE, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """x0 of shape (points, *shape) in ``dtype`` on ``device``."""
    from fpe_lab.data.images import DataError, ImageSplit, load_cifar10, load_digits
    from fpe_lab.data.toy import toy_distribution

    n = args.points
    data = args.data
    if data == "model":
        from fpe_lab.sampling import reverse_sde_sample

        x_T = sde.prior_sample((n, *shape), generator=generator, dtype=dtype).to(device)
        noise = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(args.seed)
        return reverse_sde_sample(model, sde, x_T, n_steps=args.sample_steps, eps=args.eps, generator=noise,
                                  progress=True).detach()
    if data in TOY_NAMES:
        have = (2,)
        if have != shape:
            raise CLIError(f"the model takes samples of shape {shape} but --data {data} is 2-D points {have}")
        return toy_distribution(data).sample(n, generator).to(device=device, dtype=dtype)
    try:
        if data == "cifar10":
            if args.data_dir is None:
                raise CLIError("--data cifar10 needs --data-dir (the cifar-10-batches-py folder or its parent)")
            ds = load_cifar10(args.data_dir, ImageSplit.TEST)
        else:
            ds = load_digits(ImageSplit.TEST)
    except DataError as e:
        raise CLIError(str(e).splitlines()[0]) from None
    if tuple(ds.image_shape) != tuple(shape):
        c, h, w = ds.image_shape
        raise CLIError(f"the model takes samples of shape {tuple(shape)} but --data {data} has {c}×{h}×{w} images "
                       f"(shape {tuple(ds.image_shape)})")
    if n > len(ds):
        raise CLIError(f"--points {n} exceeds the {len(ds)} images of {ds.name}")
    idx = torch.randperm(len(ds), generator=generator)[:n]
    return ds.scale(ds.pixels[idx], dtype).to(device)


# ---------------------------------------------------------------------- the command
def _audit_command(args: argparse.Namespace) -> int:
    from fpe_lab.build import resolve_device

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    if (out / AUDIT_NAME).exists() and not args.overwrite:
        raise CLIError(f"{out / AUDIT_NAME} exists; pass --overwrite to replace it")
    times = tuple(args.times) if args.times is not None else default_times(args.eps)
    if min(times) < args.eps:
        raise CLIError(f"--times must lie in [eps, 1] = [{args.eps:g}, 1]; got {list(times)}")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise CLIError(f"--times must be strictly increasing; got {list(times)}")
    try:
        device = resolve_device(DeviceChoice(args.device))
    except ValueError as e:
        raise CLIError(str(e)) from None
    dtype = DTYPES[args.dtype]
    model, sde, shape, described = _load_model(args.model, dtype, device)
    generator = torch.Generator().manual_seed(args.seed)
    x0 = _load_data(args, model, sde, shape, dtype, device, generator)
    log.info("auditing %s on %d points of %s at %d times", described, x0.shape[0], args.data, len(times))
    try:
        report = audit(model, sde, x0, times, eps=args.eps, probes=args.probes, batch_size=args.batch,
                       generator=generator, progress=True)
    except ValueError as e:
        raise CLIError(str(e).splitlines()[0]) from None
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "model": str(args.model), "model_description": described, "data": args.data,
        "data_dir": str(args.data_dir) if args.data_dir is not None else None, "seed": args.seed,
        "eps": args.eps, "dtype": args.dtype, "device": str(device),
        "sample_steps": args.sample_steps if args.data == "model" else None,
        "report": report.to_dict(),
    }
    atomic_write_text(out / AUDIT_NAME, json.dumps(record, indent=2) + "\n")
    buf = io.BytesIO()
    report_figure(report).savefig(buf, format="png", dpi=120)
    atomic_write_bytes(out / FIGURE_NAME, buf.getvalue())
    log.info("%s", report.summary())
    log.info("wrote %s and %s", out / AUDIT_NAME, out / FIGURE_NAME)
    return 0


def read_audit(path: str | Path) -> tuple[AuditReport, dict[str, Any]]:
    """(report, the rest of the record) from an ``audit.json`` written by this command."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    report = AuditReport.from_dict(record.pop("report"))
    return report, record
