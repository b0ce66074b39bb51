"""Building one component's module (UNet, transformer, text encoder, VAE) from its config, of
the class the architecture's ``model_index.json`` names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from merge_backend.architectures import Architecture


def module_class(library: str, name: str):
    """A diffusers or transformers class by name."""
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, name)
    if library == "transformers":
        import transformers

        return getattr(transformers, name)
    raise ValueError(f"cannot build a {library}.{name} (only diffusers and transformers classes)")


def build_module(component: str, config: Mapping[str, Any], *, arch: Architecture,
                 as_stored: bool = False) -> nn.Module:
    """A randomly initialised module of one component from its config, of the class the
    architecture's ``model_index.json`` names. ``as_stored``: the module as single files store
    it (the component's ``file_module``: SD2's text encoder with its 24th layer and projection).
    Build under ``torch.device("meta")`` for a shape-only module.
    """
    library, name = arch.component_class(component)
    config = dict(config)
    stored = arch.components[component].file_module if as_stored else None
    if stored is not None:
        name = stored.class_ or name
        if stored.extra_layers:
            config["num_hidden_layers"] += stored.extra_layers
    cls = module_class(library, name)
    if library == "diffusers":
        return cls.from_config(config)
    clean = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    return cls(cls.config_class(**clean))
