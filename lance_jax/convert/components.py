"""The vision components of a conversion (ViT and VAE items), and their way back to the reference layout."""
from __future__ import annotations

import dataclasses

from lance_jax.convert.lance_keys import VIT_PREFIX


@dataclasses.dataclass
class Vision:
    components: list

    def reference(self, tmp: str) -> dict:
        return {}


def vision_components(paths, model_source, vit_source: str) -> Vision:
    """ViT and VAE components (none yet)."""
    if any(k.startswith(VIT_PREFIX) for k in model_source.keys()) or paths.vit or paths.vae:
        raise NotImplementedError("ViT and VAE conversion")
    return Vision([])


class VisionWriters:
    def bundled_shape(self, key):
        raise KeyError(key)

    def bundled_tensor(self, key):
        raise KeyError(key)

    def write(self, tmp: str, progress: bool) -> list[str]:
        return []


def vision_writers(ckpt: str, manifest: dict, cast) -> VisionWriters:
    return VisionWriters()


def describe_reference(paths) -> dict:
    return {}
