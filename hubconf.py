"""torch.hub entry points: every zoo model by its name, e.g.
``torch.hub.load("path/to/metaformer-lab", "caformer_s18", source="local", num_classes=10)``."""

from typing import Any

from metaformer_lab.zoo import list_models as _list_models
from metaformer_lab.zoo.interop import create_model as _create_model

dependencies = ["torch", "timm", "pydantic", "yaml", "networkx"]


def _entrypoint(name: str) -> Any:
    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        return _create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"metaformer-lab's {name} (zoo model)."
    return entry


globals().update({_name: _entrypoint(_name) for _name in _list_models()})
