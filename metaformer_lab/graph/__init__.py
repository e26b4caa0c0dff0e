"""Spec -> typed graph (networkx), and what can be read off the graph without a module."""

from metaformer_lab.graph.lower import ArchGraph, lower

__all__ = ["ArchGraph", "lower"]
