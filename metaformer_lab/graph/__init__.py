"""Spec -> typed graph, and what can be read off the graph without a module.

``lower`` checks shapes on plain records (:class:`~metaformer_lab.graph.lower.Lowered`, no networkx);
``arch`` holds the networkx graph built from them (:class:`~metaformer_lab.graph.arch.ArchGraph`). Import
from those modules: this package imports nothing, so checking a spec never pays for networkx.
"""
