"""``python -m fpe_lab.run {toy2d,cifar10,digits} [--flags]``: train a score model and evaluate it;
``python -m fpe_lab.run eval RUN_DIR``: re-evaluate a run folder.

The three training commands are one command with three presets (:func:`fpe_lab.config.toy2d`,
``cifar10``, ``digits``). Their flags are generated from the fields of :class:`fpe_lab.config.RunConfig`
(each field's metadata names its flag and help), so every setting is a flag and a new field needs no
parser code. ``--config FILE`` starts from a saved configuration (e.g. a run's ``config.json``) instead
of the preset; flags given after it override it. Multi-GPU: ``torchrun --nproc_per_node=N -m fpe_lab.run
cifar10 ...``.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpe_lab import config as cfg
from fpe_lab import distributed, runs
from fpe_lab.build import resolve_device
from fpe_lab.checkpoint import ConfigMismatchError
from fpe_lab.commands import CLIError, EnvironmentFailure, one_line_errors, path_arg
from fpe_lab.config import Leaf, RunConfig, leaves
from fpe_lab.settings import strip_optional

__all__ = ["add_parser", "add_config_arguments", "config_from_args", "preload_plugins"]

log = logging.getLogger(__name__)

PRESETS: tuple[tuple[str, Callable[[], RunConfig], str], ...] = (
    ("toy2d", cfg.toy2d, "train a score model on 2-D toy data (DSM [+ regularizer]) and evaluate it against the truth"),
    ("cifar10", cfg.cifar10, "the same with a U-Net on CIFAR-10 (pickle batches read from --data-dir)"),
    ("digits", cfg.digits, "the same on scikit-learn's offline 8×8 digits (CPU-sized images)"),
)


# ---------------------------------------------------------------------- flags from the configuration
def preload_plugins(argv: list[str]) -> None:
    """Load the plug-ins named by ``--plugin MODULE`` in ``argv`` and by the ``plugins`` of a ``--config FILE``
    (or of a run folder's config.json named after ``eval``), so their regularizers' flags exist when the
    parser is built; CLIError naming the module when one cannot be loaded."""
    from fpe_lab import regularizers

    modules: list[str] = []
    for i, word in enumerate(argv):
        if word == "--plugin" and i + 1 < len(argv):
            modules.append(argv[i + 1])
        elif word.startswith("--plugin="):
            modules.append(word.split("=", 1)[1])
        elif word == "--config" and i + 1 < len(argv):
            modules.extend(_config_plugins(Path(argv[i + 1])))
    try:
        for module in modules:
            regularizers.load_plugin(module)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _config_plugins(path: Path) -> list[str]:
    """The ``plugins`` of a configuration file, [] when it cannot be read (the parser reports that later)."""
    import json

    try:
        plugins = json.loads(path.read_text(encoding="utf-8")).get("plugins", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _comma_list(kind: type, optional: bool = False) -> Callable[[str], list[Any] | None]:
    """A list flag's item: ``3,32,32`` or ``3`` (several items after one flag are joined); ``none`` (None) for a
    list that may be none."""

    def parse(text: str) -> list[Any] | None:
        if optional and text.lower() == "none":
            return None
        return [kind(part) for part in text.split(",") if part]

    parse.__name__ = kind.__name__
    return parse


def _nonempty(text: str) -> str:
    """A text flag's value: '' is refused here (as a folder it would mean the current one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a nonempty value; got {text!r}")
    return text


_nonempty.__name__ = "str"


class _OrNone(list):
    """The choices of an enum flag that may be none: its values and ``none``, which the flag's type reads as
    None (so None is among them)."""

    def __contains__(self, value: object) -> bool:
        return value is None or super().__contains__(value)


def _flag_value(value: Any) -> Any:
    """A parsed flag value as the configuration takes it: lists (of comma lists) become flat tuples; a list flag
    given ``none`` alone is None (``none`` beside values stays in, and the configuration refuses it)."""
    if value == [None]:
        return None
    if isinstance(value, list):
        return tuple(v for item in value for v in (item if isinstance(item, list) else [item]))
    return value


def _add_leaf(parser: argparse.ArgumentParser, leaf: Leaf, default: Any) -> None:
    kind, optional = strip_optional(leaf.kind)
    shown = default.value if isinstance(default, enum.Enum) else default
    if isinstance(shown, tuple):
        shown = " ".join(f"{v:g}" for v in shown)
    help_text = f"{leaf.help} (default: {shown})".replace("%", "%%")
    common: dict[str, Any] = dict(dest="/".join(leaf.path), default=argparse.SUPPRESS, help=help_text)
    flag = f"--{leaf.flag}"
    none = "|none" if optional else ""
    if leaf.repeat:
        (inner, _) = typing.get_args(kind)
        parser.add_argument(flag, action="append", type=inner, metavar=leaf.flag.upper(), **common)
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        values = [m.value for m in kind]
        if optional:
            parser.add_argument(flag, type=_none_or(str), choices=_OrNone([*values, "none"]), **common)
        else:
            parser.add_argument(flag, choices=values, **common)
    elif kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(kind) is tuple:
        (inner, _) = typing.get_args(kind)
        parser.add_argument(flag, nargs="+", type=_comma_list(inner, optional), metavar=inner.__name__.upper() + none,
                            **common)
    else:
        parse = _nonempty if kind is str else kind
        parser.add_argument(flag, type=_none_or(parse) if optional else parse, metavar=kind.__name__.upper() + none,
                            **common)


def add_config_arguments(parser: argparse.ArgumentParser, defaults: RunConfig, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the run configuration (help shows ``defaults``), plus ``--config FILE``."""
    parser.add_argument("--config", type=path_arg, default=None, metavar="FILE",
                        help="start from this configuration (JSON, e.g. a run's config.json) instead of the preset; "
                        "flags override it")
    for leaf in leaves():
        if leaf.flag not in skip:
            _add_leaf(parser, leaf, leaf.get(defaults))


def config_from_args(args: argparse.Namespace, preset: Callable[[], RunConfig]) -> RunConfig:
    """The preset (or ``--config``'s configuration) with the given flags applied; CLIError on bad values."""
    base = preset()
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CLIError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        try:
            base = RunConfig.from_json(text)
        except ValueError as e:
            raise CLIError(f"--config {path}: {e}") from None
    by_dest = {"/".join(leaf.path): leaf for leaf in leaves()}
    changes: dict[tuple[str, ...], Any] = {}
    for dest, value in vars(args).items():
        leaf = by_dest.get(dest)
        if leaf is not None:
            changes[leaf.path] = _flag_value(value)
    try:
        config = base.override(changes)
        runs.check_limits(config)  # what would otherwise fail only after training
    except ValueError as e:
        raise CLIError(str(e)) from None
    return config


# ---------------------------------------------------------------------- parsers
def add_parser(subparsers) -> None:
    for name, preset, help_text in PRESETS:
        p = subparsers.add_parser(name, help=help_text, allow_abbrev=False,
                                  description=f"{help_text}. Defaults: the {name} preset. "
                                  + (__doc__ or "").split("\n\n")[1].replace("\n", " "))
        add_config_arguments(p, preset())
        p.add_argument("--out", type=path_arg, default=Path("runs"),
                       help="parent folder of the run folder (default: runs)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in its folder; with a larger --steps, grow a finished run")
        p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved configuration and run folder; train nothing")
        p.set_defaults(handler=_train_command, preset=preset)
        one_line_errors(p)
    e = subparsers.add_parser("eval", help="re-evaluate a run folder (rewrites its metrics.json and figures)",
                              allow_abbrev=False,
                              description="Re-evaluate the EMA weights of a run folder; --eval-* and --device flags "
                              "override the run's evaluation settings for this evaluation (recorded in the settings of "
                              "its metrics.json; config.json is left as training wrote it).")
    e.add_argument("run_dir", type=path_arg, help="a run folder written by toy2d, cifar10 or digits")
    e.add_argument("--allow-partial", action="store_true", help="evaluate an unfinished run as it is")
    defaults = cfg.toy2d()
    for leaf in leaves():
        if leaf.path[0] == "eval" or leaf.flag == "device":
            _add_leaf(e, leaf, leaf.get(defaults))
    e.set_defaults(handler=_eval_command)
    one_line_errors(e)


def _train_command(args: argparse.Namespace) -> int:
    config = config_from_args(args, args.preset)
    try:
        env = distributed.init_from_env()
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"distributed setup failed: {e}") from None
    distributed.quiet_other_ranks(env)
    try:
        if not env.is_distributed:
            resolve_device(config.device)  # fails before any work
        if args.print_config or args.dry_run:
            if env.is_main:
                sys.stdout.write(config.to_json() + "\n")
                if args.dry_run:
                    sys.stdout.write(f"run folder: {runs.run_dir(config, args.out)}\n")
            return 0
        run = runs.train(config, Path(args.out), resume=args.resume, env=env)
    except (ValueError, ConfigMismatchError, FloatingPointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except runs.RunBusyError as e:
        raise EnvironmentFailure(str(e)) from None
    finally:
        distributed.shutdown(env)
    log.info("wrote %s", run.path)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    """Evaluate with the run's settings and the flags' overrides; config.json is never written (the
    settings used are recorded in metrics.json). Device and settings are checked before anything else."""
    try:
        run = runs.load(args.run_dir)
        by_dest = {"/".join(leaf.path): leaf for leaf in leaves()}
        changes = {by_dest[d].path: _flag_value(v)
                   for d, v in vars(args).items() if d in by_dest}
        config = run.config.override(changes) if changes else run.config
        runs.check_limits(config)
        device = resolve_device(config.device)
        report = runs.evaluate(runs.Run(run.path, config), allow_partial=args.allow_partial, device=device)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise CLIError(str(e)) from None
    except runs.RunBusyError as e:
        raise EnvironmentFailure(str(e)) from None
    log.info("%s\nwrote %s", runs.summary(report), run.path / runs.METRICS_NAME)
    return 0
