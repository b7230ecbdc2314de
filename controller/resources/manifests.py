"""Reading YAML manifests into resources, with every problem named by file, document, line and field."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controller.resources.consistency import Finding, check_consistency
from controller.resources.kinds import KINDS
from controller.resources.meta import API_VERSION, FieldProblems, Resource

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, said so that a user can find and fix it."""

    source: str
    message: str
    document: int | None = None  # 1-based index of the YAML document in its file
    line: int | None = None
    obj: str | None = None  # "Kind/name"
    field: str | None = None

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line else "")
        parts = [where]
        if self.document is not None:
            parts.append(f"document {self.document}")
        if self.obj:
            parts.append(self.obj)
        if self.field:
            parts.append(self.field)
        return ": ".join([*parts, self.message])


class ManifestError(Exception):
    """Manifests that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class Document:
    source: str
    index: int
    node: yaml.Node
    data: Any
    resource: Resource | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def label(self) -> str | None:
        if isinstance(self.data, dict):
            kind = self.data.get("kind")
            name = (
                (self.data.get("metadata") or {}).get("name") if isinstance(self.data.get("metadata"), dict) else None
            )
            if kind or name:
                return f"{kind or '?'}/{name or '?'}"
        return None

    def problem(self, message: str, path: Sequence[str | int] = (), *, line: int | None = None) -> Problem:
        return Problem(
            source=self.source,
            message=message,
            document=self.index,
            line=line or _line_of(self.node, path),
            obj=self.label,
            field=_dotted(path) or None,
        )


def manifest_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the manifest files inside the directories named (recursively, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
        else:
            files.append(path)
    return files


def parse_text(text: str, source: str) -> tuple[list[Document], list[Problem]]:
    """Split a multi-document YAML text into documents; a syntax error is one problem for the file."""
    docs: list[Document] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            docs.append(Document(source, len(docs) + 1, node, loader.construct_document(node)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"malformed YAML: {what}" + (f" ({context})" if context else "")
        return docs, [Problem(source=source, message=message, document=len(docs) + 1, line=line)]
    finally:
        loader.dispose()
    return [d for d in docs if d.data is not None], []


def validate_document(doc: Document) -> None:
    """Fill ``doc.resource`` or ``doc.problems`` from the document's data."""
    data = doc.data
    doc.problems += [doc.problem(m, p, line=line) for p, m, line in _duplicate_keys(doc.node, ())]
    if not isinstance(data, dict):
        doc.problems.append(
            doc.problem(f"expected a mapping with apiVersion, kind, metadata and spec, got {type(data).__name__}")
        )
        return
    if data.get("apiVersion") != API_VERSION:
        doc.problems.append(
            doc.problem(f"apiVersion must be {API_VERSION!r}, got {data.get('apiVersion')!r}", ["apiVersion"])
        )
        return
    kind = data.get("kind")
    if kind not in KINDS:
        doc.problems.append(doc.problem(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}", ["kind"]))
        return
    try:
        resource = KINDS[kind].model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, FieldProblems):
                doc.problems += [doc.problem(m, [*loc, *_split_dotted(p)]) for p, m in cause.problems]
            else:
                doc.problems.append(doc.problem(_message(err), loc))
        return
    if not doc.problems:
        doc.resource = resource


def load(paths: Iterable[Path], *, state_dir: str | None = None, consistency: bool = True) -> list[Resource]:
    """Read and validate manifests; raise ``ManifestError`` with every problem, or return the resources."""
    docs, problems = read_documents(paths)
    for doc in docs:
        validate_document(doc)
        problems += doc.problems
    resources = [d.resource for d in docs if d.resource is not None]
    problems += _duplicates(docs)
    if consistency:
        problems += _consistency_problems(docs, resources, state_dir)
    if problems:
        raise ManifestError(sorted(problems, key=lambda p: (p.source, p.document or 0, p.line or 0)))
    return resources


def _consistency_problems(docs: Sequence[Document], resources: list[Resource], state_dir: str | None) -> list[Problem]:
    """Cross-resource problems among the valid documents, leaving out references to invalid ones."""
    broken = {_kind_name(d) for d in docs if d.resource is None}
    broken_kinds = {kind for kind, _ in broken}
    by_key = {d.resource.key: d for d in docs if d.resource is not None}
    problems = []
    for finding in check_consistency(resources, state_dir=state_dir):
        if finding.missing is not None:
            kind, name = finding.missing
            if (kind, name) in broken or (name == "*" and kind in broken_kinds):
                continue  # already reported: the document it names did not validate
        problems.append(_finding_problem(finding, by_key))
    return problems


def _kind_name(doc: Document) -> tuple[str, str]:
    data = doc.data if isinstance(doc.data, dict) else {}
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return (str(data.get("kind")), str(meta.get("name")))


def read_documents(paths: Iterable[Path]) -> tuple[list[Document], list[Problem]]:
    docs: list[Document] = []
    problems: list[Problem] = []
    files = manifest_files(paths)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(source=str(path), message=f"cannot read: {exc}"))
            continue
        file_docs, file_problems = parse_text(text, str(path))
        docs += file_docs
        problems += file_problems
    if not files:
        problems.append(Problem(source=", ".join(str(p) for p in paths) or "-", message="no manifest files found"))
    return docs, problems


def _finding_problem(finding: Finding, by_key: dict[tuple[str, str], Document]) -> Problem:
    doc = by_key.get(finding.key)
    if doc is None:  # the object is already in the store, not in these files
        return Problem(source="(stored)", message=finding.message, obj="/".join(finding.key), field=finding.field)
    return doc.problem(finding.message, _split_dotted(finding.field))


def _duplicates(docs: Sequence[Document]) -> list[Problem]:
    seen: dict[tuple[str, str], Document] = {}
    problems = []
    for doc in docs:
        if doc.resource is None:
            continue
        first = seen.setdefault(doc.resource.key, doc)
        if first is not doc:
            problems.append(
                doc.problem(f"also declared in {first.source} document {first.index}", ["metadata", "name"])
            )
    return problems


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "literal_error":
        return f"{err['input']!r} is not allowed: {err['msg'].removeprefix('Input should be ')}"
    return str(err["msg"]).removeprefix("Value error, ")


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    # pydantic names the branch of a union or a function validator in the location; users never wrote it
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _split_dotted(text: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in text.replace("]", "").split("."):
        name, *indexes = chunk.split("[")
        if name:
            parts.append(name)
        parts += [int(i) for i in indexes]
    return parts


def _line_of(node: yaml.Node, path: Sequence[str | int]) -> int:
    """The 1-based line of the deepest node along ``path`` that exists in the document."""
    line = node.start_mark.line + 1
    for part in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v if isinstance(part, str) else None for k, v in node.value if k.value == part), None)
            if child is None:
                child = next((k for k, _ in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _duplicate_keys(node: yaml.Node, path: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], str, int]]:
    """(path, message, line) of every key repeated in its mapping: YAML loaders silently keep the last."""
    found = []
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            if key.value in keys:
                found.append(((*path, key.value), "key appears twice in the same mapping", key.start_mark.line + 1))
            keys.add(key.value)
            found += _duplicate_keys(value, (*path, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, (*path, i))
    return found
