"""RunConfig → the objects of a run: SDE, data, model, loss, device. One builder for points and images.

Points and images differ only in what is built here: a toy distribution and an MLP with the exact
divergence, or an image set and a U-Net with a Hutchinson divergence. The training loop, the
evaluator and the run folders take these objects and never look at the configuration's data kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fpe_lab import data as data_sets
from fpe_lab import regularizers
from fpe_lab.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fpe_lab.config import DeviceChoice, InitState, RunConfig, SDEConfig, SDEKind
from fpe_lab.losses import ScoreFPELoss
from fpe_lab.model import ScoreModel
from fpe_lab.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

__all__ = [
    "build_sde",
    "build_data",
    "build_eval_data",
    "build_model",
    "build_loss",
    "batch_sampler",
    "init_weights",
    "resolve_device",
]

log = logging.getLogger(__name__)


def build_sde(config: SDEConfig) -> LinearSDE:
    """The forward SDE with the configured coefficients."""
    match config.kind:
        case SDEKind.VE:
            return VESDE(sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        case SDEKind.VP:
            return VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
        case SDEKind.SUBVP:
            return SubVPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
    raise ValueError(f"sde kind must be one of {[k.value for k in SDEKind]}; got {config.kind!r}")


def build_data(config: RunConfig) -> Any:
    """Training data (:func:`fpe_lab.data.load`): ``sample(n, generator)``, ``truth(sde)``, ``dequantization()``."""
    return data_sets.load(config.data, data_sets.Split.TRAIN)


def build_eval_data(config: RunConfig) -> Any:
    """Held-out data: the test split of an image set, fresh draws of a distribution."""
    return data_sets.load(config.data, data_sets.Split.TEST)


def batch_sampler(
    config: RunConfig, data: Any, local_batch: int | None = None
) -> Callable[[torch.Generator], torch.Tensor]:
    """``sample(generator) -> x0`` of ``local_batch`` (default: the configured batch) training points."""
    n = local_batch or config.optim.batch
    if config.data.hflip:
        return lambda g: data.sample(n, g, hflip=True)
    return lambda g: data.sample(n, g)


def build_model(config: RunConfig, sde: LinearSDE, dtype: torch.dtype = torch.float32) -> ScoreModel:
    """``ScoreModel(net, sde)``: TimeMLP for points, U-Net for images, initialised from ``config.seed``
    on a forked global RNG (building a model has no side effect on it)."""
    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.data.is_image:
            import dataclasses

            from fpe_lab.nets.unet import UNet, UNetConfig

            c, h, w = config.data.shape
            unet = UNetConfig.preset(m.unet, in_channels=c, image_size=h, dropout=m.dropout)
            if m.width is not None:
                unet = dataclasses.replace(unet, channels=m.width)
            if m.depth is not None:
                unet = dataclasses.replace(unet, num_res_blocks=m.depth)
            net: torch.nn.Module = UNet(unet)
        else:
            from fpe_lab.nets.mlp import TimeMLP

            net = TimeMLP(dim=config.dim, width=m.width or 128, depth=m.depth or 3, n_freq=m.n_freq)
    return ScoreModel(net.to(dtype), sde)


def build_loss(config: RunConfig, sde: LinearSDE) -> ScoreFPELoss:
    """L = E lambda(t)‖s_θ + z/sigma‖² + lam · (the regularizer's per-sample term), lam/D with ``per_dim``."""
    reg = config.loss.reg
    regularizer = None
    if reg.kind != regularizers.NONE:
        lam = reg.lam / config.dim if reg.per_dim else reg.lam
        regularizer = regularizers.get(reg.kind).from_config(config, reg.options, lam)
    return ScoreFPELoss(sde=sde, eps=config.loss.eps, weighting=config.loss.dsm_weighting, regularizer=regularizer,
                        time_sampling=config.loss.time_sampling)


def init_checkpoint(init_from: str) -> Path:
    """The checkpoint file ``--init-from`` names (a run folder's checkpoint, or the file itself); ValueError
    when there is none."""
    path = Path(init_from)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"--init-from {init_from}: no checkpoint there (expected a run folder with "
                         f"{CHECKPOINT_NAME} or a file)")
    return path


def init_weights(model: ScoreModel, config: RunConfig) -> dict[str, Any] | None:
    """Start ``model`` from ``optim.init_from`` (a run folder or a checkpoint file); ValueError naming what
    does not fit. ``optim.init_state`` continue: the source's raw weights go into ``model`` and its EMA,
    optimizer state and step are returned (for :class:`fpe_lab.train.TrainOptions` ``initial``); fresh: the
    weights ``optim.init_weights`` names go into ``model`` and None is returned."""
    text = config.optim.init_from
    if text is None:
        return None
    path = init_checkpoint(text)
    state = load_checkpoint(path)
    continuing = config.optim.init_state is InitState.CONTINUE
    key = "model" if continuing else config.optim.init_weights.value
    sd = state.get(key) if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--init-from {path}: no {key!r} state dict in the checkpoint")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & sd.keys())
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} shape mismatches (e.g. {shapes[0]})" if shapes else ""]
        raise ValueError(f"--init-from {path} holds another architecture or data dimension: "
                         f"{', '.join(p for p in parts if p)}")
    model.load_state_dict(sd)
    if not continuing:
        log.info("initialised from the %s weights of %s (fresh optimizer and EMA)", key, path)
        return None
    if not all(k in state for k in ("ema", "optimizer", "step")):
        raise ValueError(f"--init-from {path}: the checkpoint holds no EMA, optimizer state or step to continue "
                         "(use --init-state fresh to take its weights only)")
    log.info("continuing %s from its step %d (weights, EMA and optimizer state)", path, int(state["step"]))
    return {"ema": state["ema"], "optimizer": state["optimizer"], "step": int(state["step"])}


def resolve_device(choice: DeviceChoice) -> torch.device:
    """AUTO → cuda if available else cpu; CUDA without CUDA is a ValueError."""
    match choice:
        case DeviceChoice.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case DeviceChoice.CPU:
            return torch.device("cpu")
        case DeviceChoice.CUDA:
            if not torch.cuda.is_available():
                raise ValueError("device cuda was requested but CUDA is not available (use --device cpu or auto)")
            return torch.device("cuda")
    raise ValueError(f"device must be one of {[d.value for d in DeviceChoice]}; got {choice!r}")
