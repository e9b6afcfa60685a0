"""docs/design.md names only what exists: every config field (`method.fusion`, `seed`, ...) it writes in
backticks is a field of configs/_base.py, and its pass table lists exactly the segment runner's passes."""

import pathlib
import re

from configs import _base
from experiments import common
from experiments import passes

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "design.md").read_text()
FIELDS = dict(common.config_items(_base.get_base_config().to_dict()))


def test_every_config_field_named_exists():
  sections = {name.split(".")[0] for name in FIELDS if "." in name}
  named = set(re.findall(r"`([a-z_]+(?:\.[a-z_*]+)?)`", DOC))
  fields = {n for n in named if (n.split(".")[0] in sections and n not in sections) or n in FIELDS}
  assert len(fields) >= 30, sorted(fields)  # the doc does name the fields
  missing = sorted(n for n in fields if n not in FIELDS and not (n.endswith(".*") and n[:-2] in sections))
  assert not missing, f"docs/design.md names config fields that do not exist: {missing}"


def test_pass_table_lists_exactly_the_passes():
  table = DOC[DOC.index("## The pass graph"):DOC.index("## Fingerprints")]
  rows = re.findall(r"^\| `(\w+)` \|", table, re.M)
  assert rows == [p.name for p in passes.SEGMENT]
  graph = re.search(r"source -> (.*?)\n\n", table, re.S).group(1).replace("\n", " ")
  assert [name.strip() for name in graph.split("->")] == rows
  for name in set(re.findall(r"\bpass(?:es)? ((?:`\w+`(?:, )?)+)", DOC.replace("\n", " "))):
    for pass_name in re.findall(r"`(\w+)`", name):
      assert pass_name in rows, f"docs/design.md names pass {pass_name!r}, which the runner does not have"
