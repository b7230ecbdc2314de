"""The Kubernetes shape every Tandem resource shares: metadata, status, conditions."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

API_VERSION = "tandem.dev/v1alpha1"
GROUP = "tandem.dev"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)


def _check_dns_label(name: str) -> str:
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(
            f"{name!r} is not a DNS-1123 label: at most 63 characters, lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


DnsLabel = Annotated[
    str,
    AfterValidator(_check_dns_label),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": 63}),
]


class FieldProblems(ValueError):
    """Problems a model validator found, each tied to a field path relative to the model."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))


def raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise FieldProblems(problems)


class Model(BaseModel):
    """Base of every resource part: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        extra="forbid",
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
    )


class ObjectMeta(Model):
    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class Status(Model):
    """Observed state, written by the controller; users never set it."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class Resource(Model):
    """A resource: apiVersion, kind, metadata, spec, status."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()

    api_version: Literal["tandem.dev/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta
    spec: Any
    status: Status | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.metadata.name)

    def to_dict(self) -> dict[str, Any]:
        """The resource as users see it in YAML or JSON (camelCase, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
