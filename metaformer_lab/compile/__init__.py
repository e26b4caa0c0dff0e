"""Typed graph -> nn.Module."""

from metaformer_lab.compile.compiler import compile_graph, initialize
from metaformer_lab.compile.network import Block, Network, Stage
from metaformer_lab.ops.position import PrefixTokens

__all__ = ["Block", "Network", "PrefixTokens", "Stage", "compile_graph", "initialize"]
