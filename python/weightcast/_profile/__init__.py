"""`weightcast.profile`: what each candidate precision does to a module on the user's data,
down to the layer that breaks, and how fast it runs on this machine; with ``search=True``,
the cheapest set of modules to keep at the reference precision, as rules ``convert`` reads.

The package, by concern:

- ``run``: :func:`profile` itself: the reference run, then each candidate, then the result.
- ``outputs``: a module run on a batch; the floating tensors of its output.
- ``candidates``: what a candidate names, the dtype it casts to, the module cast as it says.
- ``measure``: a row (accuracy against the reference; weight bytes; speed) and the
  :class:`~weightcast._profile.measure.Bench` every measurement shares.
- ``speed``: timing settings, latency and memory, what the device does with a dtype.
- ``layers``: per-module output ranges (forward hooks), sensitivity, the layer rows.
- ``search``: the fewest modules to keep, by bisection (``search=True``).
- ``recommend``: the tolerance check and the recommendation.
- ``result``: :class:`Profile`; ``report``: its text table and HTML page.
- ``command``: ``weightcast profile MODEL_FOLDER`` (:func:`cli`, run by ``weightcast.__main__``).
"""

from .command import cli
from .result import Profile
from .run import profile

__all__ = ["Profile", "profile", "cli"]
