"""The documentation a user follows works: every relative link in README.md and docs/*.md points
at a file of the repository (and, for `#anchor` links into Markdown, at one of its headings),
every repository file named in code spans exists, and every entry point the pages show
(`python -m jaxcontrast...`, `bash launch/...`) starts and answers `--help`."""
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of [...].
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_MODULE = re.compile(r"python3? -m (jaxcontrast(?:\.\w+)*)(?!\.\.)")   # not "jaxcontrast..."
_LAUNCHER = re.compile(r"bash (launch/[\w.-]+\.sh)")
_REPO_FILE = re.compile(r"(?<![\w/.<-])((?:configs|launch|benchmarks|tests|jaxcontrast|docs)/[\w./-]*\w\.(?:py|sh|md|png|txt))")


def _text(page: pathlib.Path) -> str:
  return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
  """The page without code blocks and inline code (links inside them are not links)."""
  return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: link targets and emphasis dropped, lower case, punctuation
  other than '-' and '_' removed, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  text = text.replace("`", "").replace("*", "").strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(text: str) -> frozenset:
  """Every heading anchor of a Markdown text, duplicates numbered as GitHub does (-1, -2, ...)."""
  seen, out = {}, set()
  for heading in _HEADING.findall(_FENCE.sub("", text)):
    slug = _slug(heading)
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return frozenset(out)


@functools.lru_cache(maxsize=None)
def anchors(page: pathlib.Path) -> frozenset:
  return _anchors(_text(page))


def _links(text: str):
  for target in _LINK.findall(_prose(text)):
    if not re.match(r"^[a-z][a-z0-9+.-]*:", target):   # not http:, https:, mailto:
      yield target


def broken_links(page: pathlib.Path, text: str):
  """(target, why) for every relative link of `text`, read as the page at `page`, that does not
  resolve."""
  out = []
  for target in _links(text):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if REPO not in dest.parents:
      out.append((target, "points outside the repository"))
    elif path and not dest.exists():
      out.append((target, "no such file"))
    elif anchor and dest.suffix == ".md":
      known = _anchors(text) if dest == page else anchors(dest)
      if anchor not in known:
        out.append((target, f"no heading with anchor #{anchor} in {dest.name}"))
  return out


def test_pages_exist():
  names = {p.name for p in PAGES}
  for name in ("losses.md", "training.md", "distributed.md", "evaluation.md", "data.md",
               "results.md", "performance.md", "METHODS.md", "CONTRIBUTING.md", "CHANGELOG.md"):
    assert name in names, f"docs/{name} is missing"


def test_every_relative_link_resolves():
  links = sum(len(list(_links(_text(page)))) for page in PAGES)
  assert links > 20     # the pages do link to each other
  broken = [(page.name, *b) for page in PAGES for b in broken_links(page, _text(page))]
  assert broken == []


def test_link_checker_catches_broken_links():
  """The checker itself: a missing file, a missing anchor (same page and another page) and an
  escape from the repository are reported; good links and links in code are not."""
  text = ("# Top heading\n\n## The `x` section, again\n\n"
          "[ok](../README.md) [ok2](#the-x-section-again) [ok3](results.md#results)\n"
          "[bad](nothing_here.md) [bad2](#nope) [bad3](../../outside.md) [bad4](results.md#nope)\n"
          "`[not a link](nothing.md)`\n\n```\n[nor this](nothing.md)\n```\n")
  found = sorted(t for t, _ in broken_links(REPO / "docs" / "probe.md", text))
  assert found == ["#nope", "../../outside.md", "nothing_here.md", "results.md#nope"]


def test_files_named_in_the_pages_exist():
  missing = []
  for page in PAGES:
    for name in _REPO_FILE.findall(_text(page)):
      if not (REPO / name).exists():
        missing.append(f"{page.name}: {name}")
  assert missing == []


# Source lines of at most 100 characters. GitHub scrolls a fenced code block sideways instead of
# wrapping it, and the raw pages are read in terminals and editors (README.md is also the package's
# long description), where longer lines wrap mid-word or run off the screen. Prose wraps anywhere;
# a long command breaks with `\` continuation lines. In docs/ pages a table row or a heading is
# exempt, since Markdown cannot continue either on a second line; README.md has none that long.
MAX_LINE = 100
_UNBREAKABLE = re.compile(r"^\s*(\||#{1,6}\s)")


def long_lines(page: pathlib.Path, text: str) -> list[str]:
  """"page:line (length)" of every line of `text` over MAX_LINE characters, fenced code included;
  outside README.md table rows and headings are exempt."""
  strict = page.name == "README.md"
  return [f"{page.name}:{n} ({len(line)})" for n, line in enumerate(text.splitlines(), 1)
          if len(line) > MAX_LINE and (strict or not _UNBREAKABLE.match(line))]


def test_lines_fit_in_100_characters():
  assert [where for page in PAGES for where in long_lines(page, _text(page))] == []


def test_line_check_catches_long_lines():
  """The checker itself: a long line of prose and one in a fenced block are reported; in a docs
  page a long table row or heading is not, in README.md it is."""
  long = "x" * (MAX_LINE + 1)
  text = f"ok\n{long}\n```bash\n{long}\n```\n| {long} |\n## {long}\n{'y' * MAX_LINE}\n"
  assert long_lines(REPO / "docs" / "data.md", text) == ["data.md:2 (101)", "data.md:4 (101)"]
  assert long_lines(REPO / "README.md", text) == [
      "README.md:2 (101)", "README.md:4 (101)", "README.md:6 (105)", "README.md:7 (104)"]


def _commands(pattern):
  found = set()
  for page in PAGES:
    found.update(pattern.findall(_text(page)))
  return sorted(found)


MODULES = _commands(_MODULE)
LAUNCHERS = _commands(_LAUNCHER)
# Scripts that install into .venv when run (pytest's --help would come after the set-up): only
# their syntax is checked, never executed by a test.
INSTALLS = {"launch/setup.sh", "launch/test.sh"}


def test_the_pages_show_the_entry_points():
  assert {"jaxcontrast.main", "jaxcontrast.eval.linear_probe"} <= set(MODULES)
  assert {"launch/local.sh", "launch/test.sh"} <= set(LAUNCHERS)


def _run(argv, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.mark.parametrize("module", MODULES)
def test_module_answers_help(module):
  """`python -m MODULE --help` starts and prints its usage. absl's --help exits with status 1 by
  design (after printing the flags and "Try --helpfull"), so that counts as an answer too; an
  import error or a flag the module does not know does not."""
  out = _run([sys.executable, "-m", module, "--help"])
  answered = out.returncode == 0 or (out.returncode == 1 and "--helpfull" in out.stdout)
  assert answered and "Traceback" not in out.stderr, (
      f"python -m {module} --help: exit {out.returncode}\n{out.stdout[-2000:]}\n"
      f"{out.stderr[-3000:]}")
  assert out.stdout.strip(), f"python -m {module} --help printed nothing"


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_answers_help(script, tmp_path):
  """`bash SCRIPT --help` prints the script's options and exits 0. It runs on a copy of the script
  alone in an empty tree, so a broken --help fails on the missing set-up instead of installing or
  starting a job."""
  path = REPO / script
  assert path.is_file(), script
  syntax = _run(["bash", "-n", str(path)])
  assert syntax.returncode == 0, syntax.stderr
  if script in INSTALLS:
    return
  copy = tmp_path / script
  copy.parent.mkdir(parents=True)
  copy.write_bytes(path.read_bytes())
  out = subprocess.run(["bash", str(copy), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, f"bash {script} --help: exit {out.returncode}\n{out.stderr[-2000:]}"
  assert "--" in out.stdout, f"bash {script} --help printed no options:\n{out.stdout}"
