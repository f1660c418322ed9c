"""`weightcast.rescale`: power-of-two factors that make a model's activations fit f16, from the
scale symmetries of its architecture, so that the same model (not a fine-tuned substitute)
runs in half precision without overflow.

The package, by concern:

- ``families``: the symmetry table, one entry per architecture family, as data.
- ``ranges``: activation ranges on the user's batches (forward hooks); outputs compared.
- ``solve``: from ranges to ``alpha`` (the residual stream), ``beta`` (linear paths inside
  blocks), each parameter's factor and the config edits.
- ``result``: :class:`Rescale`: the report, ``apply`` (through ``cast_module``), the rules file.
- ``run``: :func:`rescale` itself, with the proof.
"""

from .result import Rescale
from .run import rescale

__all__ = ["Rescale", "rescale"]
