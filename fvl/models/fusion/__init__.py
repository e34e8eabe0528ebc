"""Fusion variants, chosen by ``model.fusion.name``. Add one: a file with a ``Fusion`` subclass and one
``FUSIONS.register`` line here."""

from collections.abc import Mapping

from fvl.config.model import FusionConfig
from fvl.models.fusion.avg_pool import AveragePoolFusion
from fvl.models.fusion.base import Fusion
from fvl.models.fusion.dbfusion import ChannelConcatFusion
from fvl.models.fusion.single_layer import SingleLayerFusion
from fvl.models.fusion.token_concat import TokenConcatFusion
from fvl.util.registry import Registry

FUSIONS: Registry[Fusion] = Registry("fusion")
FUSIONS.register("dbfusion")(ChannelConcatFusion)
FUSIONS.register("token_concat")(TokenConcatFusion)
FUSIONS.register("avg_pool")(AveragePoolFusion)
FUSIONS.register("single_layer")(SingleLayerFusion)


def build_fusion(cfg: FusionConfig, dims: Mapping[str, int], tokens: int) -> Fusion:
    return FUSIONS.build(cfg.name, list(cfg.features), dims, tokens)


__all__ = ["FUSIONS", "Fusion", "build_fusion"]
