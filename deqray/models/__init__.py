"""deqray.models: the DEQ papers' models on deqray.core.

* DEQ-Transformer language model (`transformer`): relative-position
  attention in the Transformer-XL style as the equilibrium layer, adaptive
  input/softmax, segment memory.
* MDEQ (`mdeq`): multiscale equilibrium of residual blocks and fusion, with
  classification and segmentation heads.

`build(name_or_config)` builds any preset or config; `presets()` lists them.
"""

from .registry import (
    build,
    count_parameters,
    describe,
    make_config,
    preset_config,
    presets,
    register_family,
    register_preset,
)

__all__ = [
    "build",
    "count_parameters",
    "describe",
    "make_config",
    "preset_config",
    "presets",
    "register_family",
    "register_preset",
]
