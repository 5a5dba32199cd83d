"""Griffe extension (loaded by mkdocstrings, see mkdocs.yml): mtlkit's docstring dialect, read as it is meant.

Two rewrites, applied to every docstring of the package before it is parsed (the code itself is not touched):

* ``Example:`` (singular, as in Google's style guide) becomes ``Examples:``, the heading griffe's Google parser
  knows; without it the doctest lines would be rendered as prose (and ``d["a"][0]`` read as a Markdown link).
* Sphinx cross-reference roles become links.
* In an ``Args:`` section, one entry for several parameters (``max_iter, tol: ...``, which Google style has no form
  for: griffe would warn that no parameter ``max_iter, tol`` exists) becomes one entry per name; the description goes
  to the last, the others point to it.

mtlkit's docstrings are Google style but cross-reference with Sphinx roles: :func:`backward`,
:class:`~mtlkit.methods.Method`, :mod:`mtlkit.engine.gramian`, :meth:`Trainer.fit`, :data:`VERDICT_RULE`. Markdown knows no
roles, so this rewrites each one, before the docstring is parsed, into an *optional* autorefs link: a link to the
target's entry where the site renders that object, plain code where it does not (no warning either way, so a role to
a private helper is fine). A relative target is resolved the way a reader would read it: in the scope of the object
whose docstring it is, then its module's own names and imports. ``~`` shows the last component only, as in Sphinx;
``:func:`title <target>``` shows ``title``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(?P<body>[^`]+)`")
_TITLED = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>")
_ARGS_HEADER = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Params):[ \t]*$")
_SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:[ \t]*,[ \t]*\w+)+):(?P<desc>[ \t].*)$")
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


def _exists(pkg: griffe.Module, path: str) -> bool:
    try:
        pkg[path.removeprefix(pkg.name).lstrip(".")]
    except Exception:  # KeyError, or an alias that cannot be followed
        return path == pkg.name
    return True


def _resolve(pkg: griffe.Module, index: dict[str, list[str]], obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as written in the docstring of ``obj`` (``target`` itself if nothing matches).

    In order: a full ``mtlkit.`` path that exists; the name in the scope of ``obj`` and its parents (members,
    imports); the one object of the package with that name (``ConfigError`` written in a module that does not import
    it, or a name that a package binds lazily).
    """
    if (target == pkg.name or target.startswith(pkg.name + ".")) and _exists(pkg, target):
        return target
    first, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None and not target.startswith(pkg.name + "."):
        try:
            path = scope.resolve(first)
        except Exception:  # griffe.NameResolutionError, or an alias that cannot be followed
            path = None
        if path is not None:
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    name = target.rsplit(".", 1)[-1] if target.startswith(pkg.name + ".") else first
    candidates = index.get(name, [])
    if len(candidates) == 1:
        return candidates[0] if target.startswith(pkg.name + ".") or not rest else f"{candidates[0]}.{rest}"
    return target


def _rewrite(pkg: griffe.Module, index: dict[str, list[str]], obj: griffe.Object, text: str) -> str:
    def link(m: re.Match[str]) -> str:
        body = m["body"].strip()
        titled = _TITLED.fullmatch(body)
        if titled:
            title, target = titled["title"], titled["target"].strip()
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        ident = _resolve(pkg, index, obj, target.lstrip("."))
        return f'<autoref identifier="{html.escape(ident)}" optional><code>{html.escape(title)}</code></autoref>'

    return _ROLE.sub(link, text)


def _split_shared_entries(text: str) -> str:
    out: list[str] = []
    args_indent: int | None = None  # indentation of the current Args: header, None outside such a section
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        if args_indent is not None and line.strip() and indent <= args_indent:
            args_indent = None
        if (header := _ARGS_HEADER.match(line)) is not None:
            args_indent = len(header["indent"])
        elif args_indent is not None and (entry := _SHARED_ENTRY.match(line)) is not None:
            names = [n.strip() for n in entry["names"].split(",")]
            out += [f"{entry['indent']}{n}: documented with ``{names[-1]}``." for n in names[:-1]]
            line = f"{entry['indent']}{names[-1]}:{entry['desc']}"
        out.append(line)
    return "\n".join(out)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and everything defined in it, recursively (not what it imports)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found += _objects(member)  # type: ignore[arg-type]
    return found


class MtlkitDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        objects = _objects(pkg)
        index: dict[str, list[str]] = {}
        for obj in objects:
            if not obj.name.startswith("_"):
                index.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                text = _split_shared_entries(_EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value))
                obj.docstring.value = _rewrite(pkg, index, obj, text)
