"""The documentation names only configuration keys that exist, and documents every one.

Driven by the attrs schema of ``RunConfig`` (``areal_core.config``), walked recursively through
nested classes, ``X | None`` included, so a key added to the schema later is covered without
touching this file:

- ``docs/configuration.md`` has one table row per key path, ``| `full.path` | type | default |
  meaning |``: every key path of the schema has its row, no row names a key the schema lacks, and
  each row's type and default are the schema's own (rendered by ``type_cell``/``default_cell``).
  A key path is every field at every depth, except a field that is a section of its own (an attrs
  class that cannot be null, such as ``actor.optimizer``): its keys have the rows.
- Every backticked reference in README.md and ``docs/*.md`` (inline code and fenced blocks) that
  starts with a section name (``actor.``, ``rollout.``, ...: the fields of ``RunConfig`` that are
  attrs classes) names an existing key: ``actor.lora_rank=8`` counts by its key part,
  ``actor.reward_norm.{mean_level,std_level}`` by each name in the braces, and anything below a
  free-form mapping (``dataset.options.*``, ``reward.options.*``) is allowed. The retired and
  reference-system names that ``areal check`` answers with their replacement
  (``config_loader.RETIRED_KEYS``, ``REFERENCE_NAMES``) may be named too.
- README.md's relative links point at files that exist, and its YAML configs hold only known keys
  (the site's own links and anchors are checked by ``mkdocs build --strict``: ``make docs``).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import attrs
import pytest

from areal_core.config import RunConfig
from areal_core.config_loader import REFERENCE_NAMES, RETIRED_KEYS

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


def _optional(tp):
    """(None allowed, the type without None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, tp


def schema(cls=RunConfig, prefix=""):
    """{key path: (type, attrs field)} of every field at every depth."""
    out = {}
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        path = f"{prefix}{field.name}"
        tp = hints[field.name]
        out[path] = (tp, field)
        _, inner = _optional(tp)
        if attrs.has(inner):
            out.update(schema(inner, path + "."))
    return out


SCHEMA = schema()


def is_section(tp) -> bool:
    """A nested class that cannot be null: its keys are documented, not itself."""
    return attrs.has(tp)


DOCUMENTED_KEYS = sorted(p for p, (tp, _) in SCHEMA.items() if not is_section(tp))
SECTIONS = sorted(f.name for f in attrs.fields(RunConfig) if attrs.has(typing.get_type_hints(RunConfig)[f.name]))
FREE_FORM = sorted(p for p, (tp, _) in SCHEMA.items() if _optional(tp)[1] is dict or typing.get_origin(tp) is dict)


def type_cell(tp) -> str:
    """``int``, ``list[str]``, ``float or null``, ``mapping or null`` (a nested class), ...

    No ``|`` in a cell: GitHub's tables would split the cell there, even inside backticks."""
    nullable, inner = _optional(tp)
    if nullable:
        return f"{type_cell(inner)} or null"
    if attrs.has(inner):
        return "mapping"
    origin = typing.get_origin(inner)
    if origin is None:
        return getattr(inner, "__name__", str(inner))
    args = ", ".join(type_cell(a) for a in typing.get_args(inner))
    return f"{origin.__name__}[{args}]"


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", text).replace("e+", "e")
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    if attrs.has(type(value)):
        return "{}"  # the nested class with its own defaults, as `key: {}` in YAML
    return str(value)


def default_cell(field) -> str:
    """The default as YAML would write it: ``16``, ``float32``, ``""``, ``[all-linear]``, ``null``."""
    default = field.default
    if isinstance(default, attrs.Factory):
        default = default.factory()
    if field.converter is not None and default is not None:
        default = field.converter(default)
    return _value(default)


ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|\s*(.*?)\s*\|(.*)\|\s*$")


def configuration_rows() -> dict[str, tuple[str, str]]:
    """{key: (type cell, default cell)} of the rows of docs/configuration.md that name a key."""
    rows: dict[str, tuple[str, str]] = {}
    for line in CONFIGURATION.read_text().splitlines():
        match = ROW.match(line)
        if not match:
            continue
        key, tp, default = match.group(1), match.group(2), match.group(3)
        assert key not in rows, f"docs/configuration.md documents `{key}` twice"
        strip = lambda cell: cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell
        rows[key] = (strip(tp), strip(default))
    return rows


def test_the_schema_walk_sees_nested_and_optional_classes():
    assert "actor.optimizer.lr" in SCHEMA and "actor.reward_norm.std_level" in SCHEMA
    assert "tracking.wandb.mode" in SCHEMA and "actor.adv_norm.eps" in SCHEMA
    assert "actor.optimizer" not in DOCUMENTED_KEYS and "actor.reward_norm" in DOCUMENTED_KEYS
    assert {"actor", "rollout", "gconfig", "train", "dataset", "reward"} <= set(SECTIONS)


def test_every_key_of_the_schema_is_documented_with_its_type_and_default():
    rows = configuration_rows()
    missing = [key for key in DOCUMENTED_KEYS if key not in rows]
    assert not missing, f"keys of RunConfig with no row in docs/configuration.md: {missing}"
    unknown = [key for key in rows if key not in DOCUMENTED_KEYS]
    assert not unknown, f"docs/configuration.md documents keys RunConfig lacks: {unknown}"
    wrong = []
    for key in DOCUMENTED_KEYS:
        tp, field = SCHEMA[key]
        want = (type_cell(tp), default_cell(field))
        if rows[key] != want:
            wrong.append(f"`{key}`: the page says type {rows[key][0]!r}, default {rows[key][1]!r}; "
                         f"the schema has {want[0]!r}, {want[1]!r}")
    assert not wrong, "docs/configuration.md disagrees with the schema:\n" + "\n".join(wrong)


FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)


def code_spans(text: str) -> list[str]:
    spans = [m.group(0) for m in FENCE.finditer(text)]
    spans += [m.group(2) for m in INLINE.finditer(FENCE.sub("", text))]
    return spans


FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "toml", "txt", "png", "log", "db"}


def references(span: str) -> list[str]:
    """Dotted key references in a code span: ``a.b.{c,d}`` gives ``a.b.c`` and ``a.b.d``."""
    sections = "|".join(map(re.escape, SECTIONS))
    pattern = re.compile(rf"(?<![\w./$-])(?:{sections})(?:\.\w+)*(?:\.\{{[\w, ]+\}})?(?:\.\w+)*")
    found = []
    for match in pattern.finditer(span):
        ref = match.group(0)
        if "." not in ref or ref.rsplit(".", 1)[1] in FILE_SUFFIXES:  # `reward.py` is a file
            continue
        braces = re.search(r"\{([\w, ]+)\}", ref)
        if braces:
            head, tail = ref[:braces.start()], ref[braces.end():]
            found += [head + name.strip() + tail for name in braces.group(1).split(",")]
        else:
            found.append(ref)
    return found


def known(ref: str) -> bool:
    if ref in SCHEMA or ref in RETIRED_KEYS or ref in REFERENCE_NAMES:
        return True
    return any(ref.startswith(free + ".") for free in FREE_FORM)


def test_the_reference_finder():
    assert references("actor.lora_rank=8 rollout.backend=sglang") == ["actor.lora_rank", "rollout.backend"]
    assert references("actor.reward_norm.{mean_level,std_level}") == [
        "actor.reward_norm.mean_level", "actor.reward_norm.std_level"]
    assert references("areal_core/tasks/reward.py tests/train/x.py areal train my.yaml reward.py") == []
    assert known("dataset.options.path") and known("train.agreement_tolerance")
    assert not known("actor.lora_rnak") and not known("tracking.wandb.key")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_dotted_reference_names_an_existing_key(page):
    text = page.read_text()
    stale = sorted({ref for span in code_spans(text) for ref in references(span) if not known(ref)})
    assert not stale, f"{page.relative_to(REPO)} names keys the schema lacks: {stale}"


def test_the_readme_links_point_at_files_that_exist():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    broken = [t for t in targets
              if not re.match(r"[a-z]+:", t) and not t.startswith("#")
              and not (REPO / t.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_the_readme_configs_hold_only_known_keys(tmp_path):
    from areal_core.config_loader import load_config

    blocks = re.findall(r"^```yaml\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    assert blocks, "README.md shows a minimal config"
    for number, block in enumerate(blocks):
        path = tmp_path / f"readme-{number}.yaml"
        path.write_text(block)
        _, errors = load_config(path)
        assert not errors, f"README.md's config block {number}: " + "; ".join(map(str, errors))
