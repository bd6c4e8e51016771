"""Optional integrations with other systems, each behind its own extra.

Nothing here is imported by ``import pyengine``: import the submodule you need, e.g.
``from pyengine.integrations.ray import PyEngineClassifier`` (extra ``ray``).
"""
