"""crosspatch engine: model pairs, first divergence, 2x2 cross-patching, statistics, mediation.

A pure library: it never imports `app`.
"""

__version__ = "0.1.0"
