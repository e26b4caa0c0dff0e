"""Typed graph -> nn.Module."""

from metaformer_lab.compile.compiler import compile_graph, initialize
from metaformer_lab.compile.network import ConvNeXtBlock, MetaFormerBlock, Network, PrefixTokens, Stage

__all__ = ["ConvNeXtBlock", "MetaFormerBlock", "Network", "PrefixTokens", "Stage", "compile_graph", "initialize"]
