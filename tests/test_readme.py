"""Every ```python block of README.md and of docs/**/*.md runs, so that a snippet cannot go stale.

How a block is run, decided by the HTML comments right above its opening fence (blank lines may stand between):

* no comment: the block runs as it is, in a fresh namespace, in an empty temporary working directory. It must be
  complete: imports and data of its own.
* ``<!-- test-setup: tests/readme_setups.py::own_loop -->``: the block uses names the reader already has (their
  model, their data). The named function (path from the repository root) returns a dict of those names, or yields
  it and checks afterwards what the block did (see tests/readme_setups.py). Put the function there, next to the
  others, named after the snippet.
* ``<!-- test-skip: REASON -->``: the block is not run (it needs a GPU, a long download, several minutes...); the
  reason is required and shows in pytest's skip report.

A block that is neither runnable as it is nor marked fails here: fix the snippet, give it a setup, or mark it
skipped with a reason. A ``test-...`` comment that is not one of the two above fails too (a typo would otherwise
turn a check off silently). Other comments (e.g. ``<!-- --8<-- [start:NAME] -->``, the markers through which the
documentation site includes README sections) are ignored. Fences recognised: ```python, ```py, ```python3.

Run: ``python -m pytest tests/test_readme.py``; each test is named after the block's file and line.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
_COMMENT = re.compile(r"^\s*<!--(?P<body>.*?)-->\s*$")
_DIRECTIVE = re.compile(r"^\s*(?P<name>test-[\w-]*)\s*:?\s*(?P<arg>.*?)\s*$", re.DOTALL)
PYTHON = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    directives: dict[str, str]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, each with the ``test-...`` comments right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, start = m["fence"], i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m["indent"]) :] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1  # the closing fence
        if m["info"].lower() in PYTHON:
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", _directives_above(lines, start, path)))
    return blocks


def _directives_above(lines: list[str], fence: int, path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    j = fence - 1
    while j >= 0 and (not lines[j].strip() or _COMMENT.match(lines[j])):
        c = _COMMENT.match(lines[j])
        d = _DIRECTIVE.match(c["body"]) if c else None
        if d is not None:
            if d["name"] not in ("test-setup", "test-skip"):
                raise ValueError(f"{path}:{j + 1}: unknown directive {d['name']!r} (test-setup or test-skip)")
            if not d["arg"]:
                raise ValueError(f"{path}:{j + 1}: {d['name']} needs an argument (a setup, or the reason)")
            found[d["name"]] = d["arg"]
        j -= 1
    return found


def load_setup(spec: str) -> Any:
    """``tests/readme_setups.py::own_loop`` -> that function."""
    file, sep, name = spec.partition("::")
    if not sep or not name:
        raise ValueError(f"test-setup {spec!r}: expected PATH::FUNCTION, e.g. tests/readme_setups.py::own_loop")
    path = ROOT / file
    module_spec = importlib.util.spec_from_file_location(f"_readme_setup_{path.stem}", path)
    if module_spec is None or module_spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"test-setup {spec!r}: no file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"test-setup {spec!r}: {file} has no function {name!r}") from None


BLOCKS = [b for doc in DOCUMENTS if doc.is_file() for b in python_blocks(doc)]


def test_readme_has_python_blocks() -> None:
    # The README's tour has its snippet; finding none means the parser (or the README) broke.
    assert any(b.path.name == "README.md" for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_snippet_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "test-skip" in block.directives:
        pytest.skip(f"{block.id}: {block.directives['test-skip']}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    after: Iterator[Any] | None = None
    if "test-setup" in block.directives:
        setup = load_setup(block.directives["test-setup"])
        if inspect.isgeneratorfunction(setup):
            after = setup()
            namespace.update(next(after))
        else:
            namespace.update(setup())
    # Compiled as the markdown file itself, lines aligned with it: a traceback points at the README's own line.
    exec(compile("\n" * block.line + block.code, str(block.path), "exec"), namespace)
    if after is not None:
        with pytest.raises(StopIteration):
            next(after)  # runs the setup's checks; a setup must yield once
