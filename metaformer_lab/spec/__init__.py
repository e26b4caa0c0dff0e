"""The spec language: pydantic models, safe YAML, block resolution."""

from metaformer_lab.spec.arch import (
    ArchSpec,
    BlockSpec,
    ChannelMixerSpec,
    DownsampleSpec,
    HeadSpec,
    PosEmbedSpec,
    StageSpec,
    StemSpec,
    TokenMixerSpec,
)
from metaformer_lab.spec.load import dump_spec, read_spec, spec_to_dict

__all__ = [
    "ArchSpec", "BlockSpec", "ChannelMixerSpec", "DownsampleSpec", "HeadSpec", "PosEmbedSpec", "StageSpec",
    "StemSpec", "TokenMixerSpec", "dump_spec", "read_spec", "spec_to_dict",
]
