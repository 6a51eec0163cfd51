"""Every figure users read comes from a results file: the docs match docs/results/, and no prose
measurement stands without its file.

scripts/docs_tables.py renders the generated blocks of README.md and docs/*.md from the JSON files
in docs/results/ (each with its provenance: date, commit, device, processor, versions, command);
these tests fail when a block is stale, a results file lacks its provenance, or a paragraph
states a measured time, rate, ratio or percentage without naming a results file.
"""

import importlib.util
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


docs_tables = _script("docs_tables")

# A measurement: a time, a rate, a ratio, a percentage, or a difference in scientific notation with
# decimals (5.8e-6; a bound is written 1e-5). Limits and sizes such as "100 MB" or "64x64" are
# settings, not measurements, and are not matched.
FIGURE = re.compile(r"\b\d+(?:,\d{3})*(?:\.\d+)?(?:\s?(?:img/s|images/s|ms\b|s\b|sec\b|seconds\b|min\b|minutes\b"
                    r"|hours\b|GFLOP|TFLOP|%)|x\b(?![\d-])(?!\s*[-+*/]))|\b\d\.\d+e-\d+")
CITES_RESULTS = re.compile(r"docs/results/[\w.-]+\.json|results/[\w.-]+\.json")
# Figures that are settings or arithmetic, not measurements (each phrase as it stands in the docs).
SETTINGS = (
    "timeout of 2 to 5 s",  # the bucket probes' own timeouts (object_store)
    "sent again 5 ms later",  # preemption's re-sent signal
    "a 5 s connection probe",  # the TFDS download probe's timeout
    "refreshed every 60 s", "refreshed for 10 minutes",  # the bucket lock's heartbeat and takeover
    "80%",  # the Keras split, TFDS slicing syntax
    "within 2.5%",  # a test's bound (tests/test_train.py)
    "magnify any rounding 50x",  # 1 / signal rate 0.02
    "1.5e-1",  # the bf16 trajectory bound
    "loss 0.1234 170 img/s",  # an example of the progress line's format
    "took over ~2.5 s here",  # the rule for marking a test slow
)
# A figure kept from before the results files, dated and saying so: "(2026-12-05, no results file)".
DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b[^.]*?,?\s+no\s+results\s+file")
BULLET = re.compile(r"^\s*(?:[-*] |\d+\. )")


def _paragraphs(text):
  """(first line number, paragraph) outside the generated blocks: blank lines and list items
  separate them; tables and code blocks are paragraphs too."""
  spans = [(start, end) for _, _, start, end in docs_tables.blocks(text)]
  out, current, first, offset = [], [], None, 0
  for number, line in enumerate(text.split("\n"), 1):
    inside = any(start <= offset < end for start, end in spans)
    offset += len(line) + 1
    if inside or not line.strip() or (BULLET.match(line) and current):
      if current:
        out.append((first, "\n".join(current)))
      current, first = [], None
      if inside or not line.strip():
        continue
    if first is None:
      first = number
    current.append(line)
  if current:
    out.append((first, "\n".join(current)))
  return out


def test_the_generated_tables_match_their_results_files():
  """`python scripts/docs_tables.py --check`: every block equals what its files render to."""
  stale = []
  for doc in docs_tables.documents():
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
      text = f.read()
    if docs_tables.update(text) != text:
      stale.append(doc)
  assert not stale, f"stale generated tables in {stale}: run python scripts/docs_tables.py"


def test_every_results_file_names_date_commit_device_versions_and_command():
  folder = os.path.join(REPO, "docs", "results")
  names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
  assert names
  for name in names:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      result = json.load(f)
    p = result.get("provenance", {})
    missing = [k for k in docs_tables.PROVENANCE_FIELDS if k not in p]
    assert not missing, f"docs/results/{name}: provenance lacks {missing}"
    assert re.match(r"\d{4}-\d\d-\d\d", p["date"]) and p["device"] and p["command"], (name, p)


def test_every_block_names_files_that_exist_and_is_rendered_with_its_sources():
  for doc in docs_tables.documents():
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
      text = f.read()
    for renderer, files, start, end in docs_tables.blocks(text):
      assert renderer in docs_tables.RENDERERS, (doc, renderer)
      for path in files:
        assert os.path.isfile(os.path.join(REPO, path)), f"{doc}: block {renderer} names a missing {path}"
        assert f"Source: `{path}`" in text[start:end], (doc, path)


def test_no_measured_figure_without_a_results_file():
  """Each paragraph (or table, or code block) of README.md and docs/*.md that states a time, a
  rate, a ratio, a percentage or a measured difference names the results file it comes from, is a
  generated block, or is dated history that says it has no results file."""
  unbacked = []
  for doc in docs_tables.documents():
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
      text = f.read()
    previous = ""
    for line, paragraph in _paragraphs(text):
      for phrase in SETTINGS:
        paragraph = paragraph.replace(phrase, "")
      # A table belongs to the sentence that introduces it (the paragraph before).
      context = previous + "\n" + paragraph if paragraph.startswith("|") else paragraph
      previous = paragraph
      match = FIGURE.search(paragraph)
      if not match:
        continue
      cited = CITES_RESULTS.findall(context)
      if not cited and DATED.search(context):
        continue  # dated and marked as unbacked: history, not a current figure
      if not cited:
        unbacked.append(f"{doc}:{line}: {match.group(0)!r} in {paragraph[:100]!r}")
        continue
      for path in cited:
        full = path if path.startswith("docs/") else f"docs/{path}"
        assert os.path.isfile(os.path.join(REPO, full)), f"{doc}:{line} cites a missing {full}"
  assert not unbacked, "figures that name no results file:\n" + "\n".join(unbacked)


@pytest.mark.parametrize("renderer", sorted(docs_tables.RENDERERS))
def test_a_renderer_names_what_a_file_lacks(renderer, tmp_path):
  """A results file without the fields a table needs is one error naming the file and the field."""
  os.makedirs(tmp_path / "docs" / "results")
  path = "docs/results/empty.json"
  (tmp_path / path).write_text(json.dumps({"provenance": {k: "x" for k in docs_tables.PROVENANCE_FIELDS}}))
  with pytest.raises(docs_tables.ResultsError, match="empty.json"):
    docs_tables.render_block(renderer, [path], repo=str(tmp_path))


def test_a_results_file_without_provenance_is_refused(tmp_path):
  os.makedirs(tmp_path / "docs" / "results")
  (tmp_path / "docs/results/bare.json").write_text(json.dumps({"runs": []}))
  with pytest.raises(docs_tables.ResultsError, match="bare.json.*provenance"):
    docs_tables.load("docs/results/bare.json", repo=str(tmp_path))
