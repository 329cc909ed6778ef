"""mkdocs hooks of the documentation site (mkdocs.yml).

Links to repository files outside docs/ (``on_page_markdown``). A few pages link to files that
live beside docs/ (the repository's README, a plugin's README). Those links are right where the
pages are written to be read, in the repository, but the site cannot hold the files. For each such
link this hook checks that the file exists in the repository (a missing one is a warning, so
``mkdocs build --strict`` fails as on any broken link) and shows it in the site as the repository
path, or as a link into ``repo_url`` when mkdocs.yml sets one. Links between pages of the site are
left to mkdocs's own validation.

Docstring roles (``on_page_content``). The docstrings are written for ``help()`` and Sphinx-style
readers (``:class:`Solution```); the API pages render them as Markdown, where the role would show
as text before the code. The role is dropped, the code stays.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.docs_site")

_CODE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$|`[^`\n]*`", re.M | re.S)
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):(?=<code>)")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    source = Path(page.file.abs_src_path).parent

    def outside(start: int, end: int) -> str:
        link = _LINK.fullmatch(markdown, start, end)
        assert link is not None
        text, target = link.group("text"), link.group("target")
        path = target.split("#", 1)[0]
        if not path or re.match(r"[a-zA-Z][\w+.-]*:", path) or path.startswith("/"):
            return link.group(0)
        resolved = (source / path).resolve()
        if resolved.is_relative_to(docs):
            return link.group(0)
        if not resolved.is_relative_to(root) or not resolved.exists():
            log.warning("Doc file '%s' links to '%s', which is not a file of the repository",
                        page.file.src_uri, target)
            return link.group(0)
        rel = resolved.relative_to(root).as_posix()
        if config.get("repo_url"):
            return f"[{text}]({config['repo_url'].rstrip('/')}/blob/main/{rel})"
        return f"{text} (`{rel}` in the repository)"

    # a link is found where code is blanked out (code is text, not links; a link's text may hold code)
    masked = _CODE.sub(lambda code: re.sub(r"[^\n]", " ", code.group(0)), markdown)
    pieces, last = [], 0
    for link in _LINK.finditer(masked):
        pieces += [markdown[last:link.start()], outside(link.start(), link.end())]
        last = link.end()
    return "".join(pieces) + markdown[last:]


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return _ROLE.sub("", html)
