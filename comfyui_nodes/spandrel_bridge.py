"""ESC in spandrel, as ComfyUI sees it.

:func:`register` adds the ESC architectures to spandrel's global registry (idempotent; the
registration itself lives in :mod:`esc_arch.spandrel`), which is all ComfyUI's stock
"Load Upscale Model" needs to load ESC checkpoints.

:func:`describe` turns a network loaded by :func:`esc_arch.load_model` into the spandrel
``ImageModelDescriptor`` that ComfyUI passes around as ``UPSCALE_MODEL``.  The descriptor's
metadata (architecture, scale, size requirements, half-precision support) comes from the same
registered ESC architecture that the stock loader uses, so both loaders produce equivalent
objects; only the network is ours (it honours checkpoint metadata and the attention backend).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def register() -> None:
    """Register ESC with spandrel's MAIN_REGISTRY (safe to call any number of times)."""
    from esc_arch import spandrel as esc_spandrel

    esc_spandrel.install()


def describe(network: nn.Module) -> Any:
    """A spandrel ``ImageModelDescriptor`` wrapping ``network`` (any esc_arch image model).

    The arbitrary-scale ESC-LTE gets what the registered architecture gives it: a fixed x4
    scale (``esc_arch.spandrel.LTE_SCALE``) whose call renders x4, so the stock upscale node can
    run it; "Upscale Image by Factor (ESC arbitrary-scale)" uses the network at any factor.
    """
    register()
    import spandrel
    from esc_arch import spandrel as esc_spandrel

    probe = spandrel.ModelLoader().load_from_state_dict(network.state_dict())
    probe_arch = getattr(probe.model, "arch_name", None)
    if not isinstance(probe, spandrel.ImageModelDescriptor) or probe_arch != network.arch_name:
        raise TypeError(f"spandrel describes this {network.arch_name} checkpoint as {probe.architecture.name} "
                        f"({type(probe).__name__}); expected the registered ESC architecture")
    return spandrel.ImageModelDescriptor(
        network,
        network.state_dict(),
        architecture=probe.architecture,
        purpose=probe.purpose,
        tags=list(probe.tags),
        supports_half=probe.supports_half,
        supports_bfloat16=probe.supports_bfloat16,
        scale=probe.scale,
        input_channels=probe.input_channels,
        output_channels=probe.output_channels,
        size_requirements=probe.size_requirements,
        tiling=probe.tiling,
        call_fn=_render_at(esc_spandrel.LTE_SCALE) if network.arch_name == "ESCLTE" else None,
    )


def _render_at(factor: int):
    """The call of an arbitrary-scale model inside a fixed-scale descriptor."""

    def call(module: nn.Module, image: Any) -> Any:
        return module.upscale_by(image, factor)

    return call
