"""Job-submission forms generated from the job spec schemas (`schemas/jobs.py`), prefilled with their
OpenAPI examples (`schemas/examples.py`); a submitted form becomes a `JobCreate` and goes through the API's
own submit service."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from crosspatch.app.errors import Invalid
from crosspatch.app.schemas.examples import JOB_CREATE_EXAMPLES
from crosspatch.app.schemas.jobs import JobCreate, JobSpec

Widget = Literal["checkbox", "select", "int", "float", "text", "json"]


@dataclass(frozen=True)
class FormField:
    """One input of a job form: its name, widget, label, help text and prefilled value."""

    name: str
    widget: Widget
    label: str
    help: str
    value: str
    options: tuple[str, ...] = ()
    required: bool = False


def spec_models() -> dict[str, type[BaseModel]]:
    """Each job kind's spec model, by kind (from the discriminated union the API validates against)."""
    union = typing.get_args(typing.get_args(JobSpec)[0])
    return {m.model_fields["kind"].default: m for m in union}


def example_spec(kind: str) -> dict[str, Any]:
    """The first OpenAPI example of this kind (its spec), or {}."""
    for ex in JOB_CREATE_EXAMPLES.values():
        spec = ex["value"]["spec"]
        if spec.get("kind") == kind:
            return spec
    return {}


def _without_none(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def _widget(annotation: Any) -> tuple[Widget, tuple[str, ...]]:
    inner, _ = _without_none(annotation)
    while typing.get_origin(inner) is typing.Annotated:
        inner = typing.get_args(inner)[0]
    if inner is bool:
        return "checkbox", ()
    if typing.get_origin(inner) is Literal:
        return "select", tuple(str(a) for a in typing.get_args(inner))
    if inner is int:
        return "int", ()
    if inner is float:
        return "float", ()
    if inner is str:
        return "text", ()
    return "json", ()


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.default is PydanticUndefined else info.default


def _as_text(value: Any, widget: Widget) -> str:
    if value is None:
        return ""
    if widget == "json":
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return json.dumps(value, indent=1) if not isinstance(value, str) else value
    if widget == "checkbox":
        return "on" if value else ""
    return str(value)


def form_fields(kind: str, values: dict[str, Any] | None = None) -> list[FormField]:
    """The inputs of `kind`'s form: one per spec field (nested options as JSON), prefilled from `values`
    (a re-shown form), else the kind's example, else the schema default."""
    model = spec_models()[kind]
    example = example_spec(kind)
    out = []
    for name, info in model.model_fields.items():
        if name == "kind":
            continue
        widget, options = _widget(info.annotation)
        if values is not None:
            text = values.get(name, "")
        else:
            text = _as_text(example.get(name, _default(info)), widget)
        label = name.replace("_", " ")
        if widget == "json":
            label += " (JSON)"
        out.append(
            FormField(
                name=name,
                widget=widget,
                label=label,
                help=info.description or "",
                value=text,
                options=options,
                required=info.is_required(),
            )
        )
    return out


def parse_form(kind: str, form: dict[str, str]) -> JobCreate:
    """A submitted form as a `JobCreate` (422 `Invalid` naming the field on bad input)."""
    if kind not in spec_models():
        raise Invalid("spec.kind", f"unknown job kind {kind!r}; choose from {', '.join(spec_models())}")
    spec: dict[str, Any] = {"kind": kind}
    for f in form_fields(kind, values={}):
        raw = form.get(f.name, "").strip()
        if f.widget == "checkbox":
            spec[f.name] = f.name in form
        elif not raw:
            continue  # the schema's default
        elif f.widget == "json":
            try:
                spec[f.name] = json.loads(raw)
            except json.JSONDecodeError:
                spec[f.name] = raw  # a bare word such as `sweep`
        elif f.widget in ("int", "float"):
            try:
                spec[f.name] = int(raw) if f.widget == "int" else float(raw)
            except ValueError as e:
                raise Invalid(f"spec.{f.name}", f"not a number: {raw!r}") from e
        else:
            spec[f.name] = raw
    body: dict[str, Any] = {"spec": spec, "share": form.get("share", "lab")}
    if form.get("priority", "").strip():
        try:
            body["priority"] = int(form["priority"])
        except ValueError as e:
            raise Invalid("priority", f"not a number: {form['priority']!r}") from e
    try:
        return JobCreate.model_validate(body)
    except ValidationError as e:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"] if not str(p).endswith("Spec")),
                "reason": err["msg"],
            }
            for err in e.errors()
        ]
        invalid = Invalid(errors[0]["field"], errors[0]["reason"])
        invalid.message = "; ".join(f"{x['field']}: {x['reason']}" for x in errors[:5])
        raise invalid from e
