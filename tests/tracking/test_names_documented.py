"""docs/tracking.md's table is the naming rules of areal_core/tracking/names.py, row for row."""

import re
from pathlib import Path

from areal_core.tracking.names import EXACT, FALLBACK, PREFIXES, SUFFIXES

DOC = Path(__file__).resolve().parents[2] / "docs" / "tracking.md"


def documented_rows() -> dict[str, str]:
    section = DOC.read_text().split("## Names", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)`", section, flags=re.M)
    return dict(rows)


def test_every_rule_is_a_row_and_every_row_a_rule():
    expected = dict(EXACT)
    expected.update({prefix + "*": group + "*" for prefix, group in PREFIXES})
    expected.update({"*" + suffix: group + "*" for suffix, group in SUFFIXES})
    assert documented_rows() == expected
    assert f"`{FALLBACK}*`" in DOC.read_text()
