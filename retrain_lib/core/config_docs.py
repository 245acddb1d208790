"""The object-type config reference (docs/configuration.md), generated from the models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from retrain_lib.core.config import (
    METRIC_NAMES,
    TRAIN_OVERRIDE_KEYS,
    CandidateConfig,
    GuardMetric,
    ObjectTypeConfig,
)

__all__ = ["config_reference_markdown"]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    for noise in ("typing.", "retrain_lib.core.config.", "Annotated[", "NoneType"):
        text = text.replace(noise, "" if noise != "NoneType" else "None")
    return text.replace("Literal", "one of ")


def config_reference_markdown() -> str:
    """The object-type config reference, generated from the models (docs/configuration.md)."""
    lines = [
        "# Object-type configuration reference",
        "",
        "One YAML file per object type: `configs/object_types/<name>.yaml`. Unknown keys are",
        "errors. Check files with `autoretrain config validate configs/object_types`.",
        "This page is generated from the models in `retrain_lib/core/config.py` by",
        "`autoretrain config docs`; a test keeps it in sync.",
        "",
    ]

    def section(title: str, model: type[BaseModel]) -> None:
        lines.extend([f"## `{title}`", "", (model.__doc__ or "").strip(), "",
                      "| key | type | default | meaning |", "|---|---|---|---|"])
        nested: list[tuple[str, type[BaseModel]]] = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((f"{title}.{name}" if title != "(top level)" else name,
                               annotation))
                default = "see below"
            elif field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                    value = [v.model_dump(exclude_defaults=True) for v in value]
                default = f"`{value!r}`" if value is not None else "`null`"
            kind = _type_name(annotation).replace("|", "\\|")
            meaning = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {default} | {meaning} |")
        lines.append("")
        for child_title, child in nested:
            section(child_title, child)

    section("(top level)", ObjectTypeConfig)
    lines.extend(["## Candidate entries (`training.candidates[]`)", "",
                  "| key | meaning |", "|---|---|"])
    for name, field in CandidateConfig.model_fields.items():
        lines.append(f"| `{name}` | {field.description} |")
    lines.extend(["", "Allowed `overrides` keys: " +
                  ", ".join(f"`{k}`" for k in sorted(TRAIN_OVERRIDE_KEYS)) + ".", "",
                  "## Guard entries (`promotion.guards[]`)", "",
                  "| key | meaning |", "|---|---|"])
    for name, field in GuardMetric.model_fields.items():
        lines.append(f"| `{name}` | {field.description} |")
    lines.extend(["", "Metric names: " + ", ".join(f"`{m}`" for m in METRIC_NAMES) + ".", ""])
    return "\n".join(lines)
