"""Reading manifests: every problem is reported at once, each naming file, document, line, object, field."""

from pathlib import Path

import pytest

from controller.cli import main
from controller.resources import Module
from controller.resources.manifests import ManifestError, load

ROOT = Path(__file__).resolve().parents[2]
BROKEN = Path(__file__).parent / "broken"


def test_the_example_manifests_are_valid() -> None:
    resources = load([ROOT / "manifests"])
    kinds = {r.kind for r in resources}
    assert kinds == {"Cluster", "Module", "ReplicatedDir", "VirtualIP", "Checker"}
    modes = {r.name: r.spec.mode for r in resources if isinstance(r, Module)}
    assert "mirror" in modes.values() and "farm" in modes.values()


def test_broken_manifests_give_one_precise_message_per_problem() -> None:
    with pytest.raises(ManifestError) as exc:
        load([BROKEN])
    assert [str(p) for p in exc.value.problems] == [
        f"{BROKEN}/bad-duration.yaml:9: document 1: Checker/app-port: spec.interval: invalid duration '10 seconds': "
        "expected a number and a unit (ms, s, m, h), e.g. 700ms, 30s, 24h",
        f"{BROKEN}/dangling-module.yaml:5: document 1: ReplicatedDir/orphan-data: spec.module: "
        "Module 'missing-module' does not exist",
        f"{BROKEN}/malformed.yaml:4: document 1: malformed YAML: expected ',' or '}}', but got ':' "
        "(while parsing a flow mapping)",
        f"{BROKEN}/nested-paths.yaml:13: document 2: ReplicatedDir/app-logs: spec.path: "
        "/srv/app/logs is nested in /srv/app (ReplicatedDir 'app-data')",
        f"{BROKEN}/three-node-mirror.yaml:6: document 1: Module/big: spec.nodes: "
        "a mirror module has exactly 2 nodes, this one has 3",
        f"{BROKEN}/unknown-field.yaml:7: document 1: VirtualIP/app-vip: spec.gratuitousArps: unknown field",
    ]


def test_validate_exits_1_and_prints_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(BROKEN)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(line.startswith("error: ") for line in err)
    assert main(["validate", "-f", str(ROOT / "manifests")]) == 0


def test_a_duplicate_key_and_a_duplicate_object_are_problems(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: tandem.dev/v1alpha1\nkind: Module\nmetadata: {name: m}\nspec:\n  nodes: [a, b]\n  nodes: [a, b]\n"
    )
    same = "apiVersion: tandem.dev/v1alpha1\nkind: Module\nmetadata: {name: n}\nspec: {nodes: [a, b]}\n"
    (tmp_path / "b.yaml").write_text(same)
    (tmp_path / "c.yaml").write_text(same)
    with pytest.raises(ManifestError) as exc:
        load([tmp_path], consistency=False)
    messages = [str(p) for p in exc.value.problems]
    assert messages == [
        f"{tmp_path}/a.yaml:6: document 1: Module/m: spec.nodes: key appears twice in the same mapping",
        f"{tmp_path}/c.yaml:3: document 1: Module/n: metadata.name: also declared in {tmp_path}/b.yaml document 1",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: Module\nmetadata: {name: m}\nspec: {nodes: [a, b]}\n",
            "apiVersion must be 'tandem.dev/v1alpha1', got None",
        ),
        ("apiVersion: tandem.dev/v1alpha1\nkind: Pod\n", "unknown kind 'Pod'"),
        ("- a\n- b\n", "expected a mapping with apiVersion, kind, metadata and spec, got list"),
        ("apiVersion: tandem.dev/v1alpha1\nkind: Module\nmetadata: {name: m}\n", "spec: required field is missing"),
    ],
)
def test_documents_that_are_not_resources_are_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(ManifestError, match=message):
        load([tmp_path / "x.yaml"], consistency=False)


def test_a_missing_file_and_an_empty_directory_are_problems(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load([tmp_path / "nope.yaml"])
    with pytest.raises(ManifestError, match="no manifest files found"):
        load([tmp_path])
