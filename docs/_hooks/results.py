"""mkdocs hook: the committed benchmark results (``benchmarks/results/``) become the site's ``results/`` folder.

Every file there (the markdown reports, their PNG figures and JSON data) is added to the site under ``results/``, so
the guide and the reproduction pages link to them (``../results/NAME.md``) and each report renders as a page with its
figures; ``benchmarks/results/README.md`` is that folder's index page. Nothing is copied into ``docs/``: the committed
files stay the only copy, and a new result file appears on the site without touching the docs.

A report may start with an HTML comment that records how it was produced (the command lines). A browser would hide
it, so on the site it is shown as a "How this was produced" note instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PREFIX = "results/"
_LEADING_COMMENT = re.compile(r"\A\s*<!--(?P<text>.*?)-->\s*", re.DOTALL)


def on_files(files: Files, config, **kwargs) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            # Not in the nav (one entry, the folder's README, is): reachable from that index and the pages' links.
            inclusion = InclusionLevel.INCLUDED if path.name == "README.md" else InclusionLevel.NOT_IN_NAV
            files.append(File.generated(config, PREFIX + path.name, abs_src_path=str(path), inclusion=inclusion))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if not page.file.src_uri.startswith(PREFIX):
        return markdown
    m = _LEADING_COMMENT.match(markdown)
    if m is None:
        return markdown
    text = m["text"].strip()
    body = "\n".join("    " + line if line.strip() else "" for line in ["```text", *text.splitlines(), "```"])
    return f'!!! note "How this was produced"\n\n{body}\n\n' + markdown[m.end() :]
