"""``esc-sr info MODEL``: a checkpoint's variant, scale, hyperparameters, parameters and attention kernel, and for a
published model (embedded or official: :mod:`esc_sr.cards`) its training data, degradation, licence and source."""

from __future__ import annotations

import argparse
from typing import Any

from .. import facts
from ._common import EXIT_OK, add_max_parameters, load_cli_model, one_line, usage_error

__all__ = ["add_parser", "describe_model", "info_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a model: variant, scale, parameters, training data and licence (published models), "
             "hyperparameters, attention kernel",
        description="Load a checkpoint and describe it, including which attention kernel runs on this device.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file, official name or 'default'")
    parser.add_argument("--device", default="auto", help="device to report the attention kernel for (default auto)")
    parser.add_argument("--precision", choices=facts.PRECISIONS, default=facts.DEFAULT_PRECISION)
    parser.add_argument("--attention", choices=facts.ATTENTION_BACKENDS, default=None,
                        help="report for this attention backend instead of the model's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_max_parameters(parser)
    parser.set_defaults(func=info_command)


def model_card(name: str | None, model) -> dict[str, Any] | None:
    """The card of a published model: by its name (embedded, or an official release name, also as a file name),
    else by its weights (a copy of an embedded model), else None."""
    from .. import cards

    card = (cards.card_for_name(name) if name is not None else None) or cards.identify(model.state_dict())
    return None if card is None else card.as_dict()


def describe_model(model, *, device, dtype, name: str | None = None) -> dict[str, Any]:
    """The facts ``esc-sr info`` prints, as a dict (``card``: :func:`model_card` of ``name``, or None)."""
    import torch

    import esc_arch
    import esc_runtime

    return {
        "card": model_card(name, model),
        "arch": model.arch_name,
        "preset": esc_arch.match_preset(model),
        "scale": "any (arbitrary-scale)" if model.arbitrary_scale else model.scale,
        "window_size": model.window_size,
        "parameters": esc_arch.count_parameters(model),
        "hyperparameters": dict(model.hyperparameters),
        "attention_backend": model.attn_type,
        "attention_kernel": esc_runtime.attention_kernel(model, device, dtype),  # what the engine runs
        # each kind of layer's implementation for inference here, and why not the faster ones
        "runtime": esc_runtime.plan(model, esc_runtime.Target(torch.device(device), dtype)).describe(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def info_command(args: argparse.Namespace) -> int:
    import json

    from .. import engine

    try:
        device = engine.resolve_device(args.device)
        dtype = engine.resolve_precision(args.precision, device)
    except engine.EngineError as exc:
        raise usage_error(f"--device {args.device} --precision {args.precision}: {one_line(exc)}") from exc
    model = load_cli_model(args.model, attention=args.attention, max_parameters=args.max_parameters)
    about = describe_model(model, device=device, dtype=dtype, name=args.model)
    about = {"model": args.model, **about}
    if args.json:
        print(json.dumps(about, indent=2, default=str))
        return EXIT_OK
    hyper = ", ".join(f"{k}={v!r}" for k, v in about["hyperparameters"].items())
    variant = about["arch"] + (f" (preset {about['preset']})" if about["preset"] else " (custom configuration)")
    lines = [
        f"model:            {about['model']}",
        f"variant:          {variant}",
        f"scale:            {about['scale'] if isinstance(about['scale'], str) else 'x' + str(about['scale'])}",
        f"window size:      {about['window_size']} (inputs are reflect-padded to a multiple of it)",
        f"parameters:       {about['parameters']:,}",
        *_card_lines(about["card"]),
        f"hyperparameters:  {hyper}",
        f"attention:        {about['attention_backend']} -> {about['attention_kernel']}",
        f"                  (on {about['device']}, {about['dtype']})",
        *(f"{'runtime:' if i == 0 else '':<18}{line}" for i, line in enumerate(about["runtime"])),
    ]
    print("\n".join(lines))
    return EXIT_OK


def _card_lines(card: dict[str, Any] | None) -> list[str]:
    if card is None:
        return ["published as:     not a known published model (training data and licence: ask its author)"]
    lines = [
        f"published as:     {card['name']} ({card['variant']}, x{card['scale']})",
        f"training data:    {card['training_data']}",
        f"degradation:      {card['degradation']}",
        f"licence:          {card['license']}",
        f"source:           {card['source']}",
    ]
    if card.get("card"):
        lines.append(f"model card:       {card['card']}")
    if card.get("status"):
        lines.append(f"status:           {card['status']}")
    return lines
