"""The CRDs in crds/ are generated from the models, and the example manifests satisfy them."""

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller.resources import KINDS
from controller.resources.crd import render
from controller.resources.manifests import manifest_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", ["crds", "helm/tandem/crds"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_crds_directories_match_the_models(kind: str, directory: str) -> None:
    cls = KINDS[kind]
    path = ROOT / directory / f"{cls.PLURAL}.tandem.dev.yaml"
    assert path.is_file(), f"{path} is missing: run `tandem crds --dir {directory}`"
    assert path.read_text() == render(cls), f"{path} is out of date: run `tandem crds --dir {directory}`"


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI's `nullable` as JSON schema's null type; Kubernetes extensions dropped."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(kind: str) -> dict[str, Any]:
    cls = KINDS[kind]
    crd = yaml.safe_load((ROOT / "crds" / f"{cls.PLURAL}.tandem.dev.yaml").read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["apiVersion"] == "apiextensions.k8s.io/v1"
    return openapi_to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files([ROOT / "manifests"]):
        docs += [
            (f"{path.name}:{d['kind']}/{d['metadata']['name']}", d) for d in yaml.safe_load_all(path.read_text()) if d
        ]
    return docs


@pytest.mark.parametrize(("label", "doc"), example_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_example_manifest_satisfies_its_crd_schema(label: str, doc: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)


def test_the_crd_schema_refuses_what_the_models_refuse() -> None:
    schema = crd_schema("Module")
    bad = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "Module",
        "metadata": {"name": "m"},
        "spec": {"nodes": ["a", "b"], "mode": "cluster", "heartbeat": {"pulse": "7 seconds"}},
    }
    problems = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert len(problems) == 2
    assert "'cluster' is not one of ['mirror', 'farm']" in problems
    assert any("'7 seconds' does not match" in p for p in problems)
