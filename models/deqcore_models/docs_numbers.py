"""``python -m deqcore_models.docs_numbers [--check]``: rewrite (or check) the generated blocks
and checked numbers of the documentation, with every experiment page's renderer registered.

The engine (markers, queries, checks) is :mod:`deqcore_models.doc_blocks`; this module is the
command, so it imports the experiments, whose renderers the pages name, and re-exports the
engine's names.
"""

import sys

from . import experiments  # noqa: F401  (registers the experiment pages' renderers)
from .doc_blocks import (
    CHECK,
    COMMAND,
    END,
    PAGES,
    START,
    Found,
    Registered,
    block,
    blocks,
    check_number,
    load,
    main,
    pages,
    problems,
    query,
    refresh,
    refresh_pages_of,
    renderer,
    renderers,
    repository_of,
    start_line,
    write_page,
)

__all__ = ["CHECK", "COMMAND", "END", "PAGES", "START", "Found", "Registered", "block", "blocks",
           "check_number", "load", "main", "pages", "problems", "query", "refresh", "refresh_pages_of",
           "renderer", "renderers", "repository_of", "start_line", "write_page"]

if __name__ == "__main__":
    sys.exit(main())
