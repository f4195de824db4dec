"""The ESC nodes on ComfyUI's V3 schema (``comfy_api.latest``: ``io.ComfyNode``, ``comfy_entrypoint``).

The same three nodes as :mod:`comfyui_nodes.nodes` (the V1 API), with the same ids, display names, category,
inputs (names, types, defaults, ranges, tooltips) and behaviour: each V3 schema is built from its V1 node's
``INPUT_TYPES``/``RETURN_TYPES``, and each ``execute`` calls the V1 node's function, so the two cannot drift apart.

Only imported where ComfyUI has the V3 API (``comfyui_nodes.node_api()``); ComfyUI calls a module's
``comfy_entrypoint`` only when it has no ``NODE_CLASS_MAPPINGS``, so the package exports one or the other.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io

from . import nodes as v1

# V1 type string -> V3 type (a combo is a list in V1).
_TYPES = {
    "INT": io.Int,
    "FLOAT": io.Float,
    "IMAGE": io.Image,
    "MASK": io.Mask,
    "UPSCALE_MODEL": io.UpscaleModel,
}


def _input(name: str, spec: tuple, optional: bool) -> Any:
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, optional=optional, **options)
    return _TYPES[kind].Input(name, optional=optional, **options)


def _schema(node_id: str, node: type) -> Any:
    declared = node.INPUT_TYPES()
    inputs = [_input(name, spec, False) for name, spec in declared["required"].items()]
    inputs += [_input(name, spec, True) for name, spec in declared.get("optional", {}).items()]
    outputs = [_TYPES[kind].Output(display_name=name) for kind, name in zip(node.RETURN_TYPES, node.RETURN_NAMES)]
    return io.Schema(
        node_id=node_id,
        display_name=v1.NODE_DISPLAY_NAME_MAPPINGS[node_id],
        category=node.CATEGORY,
        description=node.DESCRIPTION,
        inputs=inputs,
        outputs=outputs,
    )


def _run(node: type, **inputs: Any) -> Any:
    return io.NodeOutput(*getattr(node(), node.FUNCTION)(**inputs))


class ESCModelLoader(io.ComfyNode):
    """Load ESC Model (V3)."""

    @classmethod
    def define_schema(cls) -> io.Schema:  # called for every /object_info: the file list is re-read
        return _schema("ESCModelLoader", v1.LoadESCModel)

    @classmethod
    def execute(cls, **inputs: Any) -> io.NodeOutput:
        return _run(v1.LoadESCModel, **inputs)


class ESCUpscaleImage(io.ComfyNode):
    """Upscale Image (ESC) (V3)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("ESCUpscaleImage", v1.UpscaleImageESC)

    @classmethod
    def execute(cls, **inputs: Any) -> io.NodeOutput:
        return _run(v1.UpscaleImageESC, **inputs)


class ESCUpscaleImageByFactor(io.ComfyNode):
    """Upscale Image by Factor (ESC arbitrary-scale) (V3)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("ESCUpscaleImageByFactor", v1.UpscaleImageByFactorESC)

    @classmethod
    def execute(cls, **inputs: Any) -> io.NodeOutput:
        return _run(v1.UpscaleImageByFactorESC, **inputs)


NODES: list[type[io.ComfyNode]] = [ESCModelLoader, ESCUpscaleImage, ESCUpscaleImageByFactor]


class ESCExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ESCExtension:
    return ESCExtension()
