"""The WSSS methods: each builds its network and computes its losses and CAMs.

``build_method(config, num_classes)`` makes the network ``config.method`` names; adding
a method means one file here, one config section in ``wsss_fast.config`` and one entry
in ``BUILDERS``.
"""

from collections.abc import Callable

from wsss_fast.config import TrainConfig
from wsss_fast.methods.apc import APC
from wsss_fast.methods.base import StepOutput, WSSSMethod
from wsss_fast.methods.pixel_sup import PixelSup
from wsss_fast.methods.toco import ToCo
from wsss_fast.methods.weaktr import WeakTrBuilder, WeakTrCAM, WeakTrSegmenter


def _build_toco(config: TrainConfig, num_classes: int) -> ToCo:
    return ToCo(config.model, config.toco, num_classes, config.augmentation.crop_size)


def _build_apc(config: TrainConfig, num_classes: int) -> APC:
    return APC(config.model, config.apc, num_classes, config.augmentation.crop_size)


def _build_pixel_sup(config: TrainConfig, num_classes: int) -> PixelSup:
    return PixelSup(config.model, config.pixel_sup, num_classes, config.augmentation.crop_size)


BUILDERS: dict[str, Callable[[TrainConfig, int], WSSSMethod]] = {
    "toco": _build_toco,
    "pixel_sup": _build_pixel_sup,
    "apc": _build_apc,
    "weaktr": WeakTrBuilder(),
}


def build_method(config: TrainConfig, num_classes: int) -> WSSSMethod:
    """The network of ``config.method`` for ``num_classes`` foreground classes."""
    if config.method not in BUILDERS:
        raise ValueError(f"method must be one of {tuple(BUILDERS)}, got {config.method!r}")
    return BUILDERS[config.method](config, num_classes)


__all__ = [
    "APC",
    "BUILDERS",
    "PixelSup",
    "StepOutput",
    "ToCo",
    "WSSSMethod",
    "WeakTrCAM",
    "WeakTrSegmenter",
    "build_method",
]
