"""MkDocs hooks for the documentation site (see ``mkdocs.yml``).

* Files from outside ``docs/`` are published at their repository paths:
  ``benchmarks/README.md`` (the benchmark results) and the files it shows.
* A link that works on GitHub but leaves ``docs/`` (``../benchmarks/README.md``)
  is rewritten to the published page.
* Every ``api/<module>.md`` in the nav without a file of its own is generated
  as ``::: <module>`` (the module's public docstrings, through mkdocstrings),
  so adding a module to the API reference is one line of the nav.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

# Repository files published as they are, at the same path in the site.
EXTRA_FILES = (
    "benchmarks/README.md",
    "benchmarks/results/results.md",
    "benchmarks/results/results.png",
)

_LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def _repo(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _api_pages(nav) -> list[str]:
    pages = []
    for item in nav or []:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, list):
                pages += _api_pages(value)
            elif isinstance(value, str) and re.fullmatch(r"api/[\w.]+\.md", value):
                pages.append(value)
    return pages


def on_files(files: Files, config) -> Files:
    repo = _repo(config)
    for path in EXTRA_FILES:
        files.append(File(path, str(repo), config.site_dir, config.use_directory_urls))
    for page in _api_pages(config.nav):
        if files.get_file_from_path(page) is None:
            module = page[len("api/") : -len(".md")]
            content = (
                f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
            )
            files.append(File.generated(config, page, content=content))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Rewrites links that leave ``docs/`` on GitHub into links to the published pages."""
    src = page.file.src_uri
    repo_path = src if src in EXTRA_FILES else f"docs/{src}"
    here = posixpath.dirname(src)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        if files.get_file_from_path(posixpath.normpath(posixpath.join(here, target))):
            return m.group(0)  # already a page of the site
        in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), target))
        site = in_repo[len("docs/") :] if in_repo.startswith("docs/") else in_repo
        if files.get_file_from_path(site) is None:
            return m.group(0)  # left for mkdocs to report
        return m.group(1) + posixpath.relpath(site, here or ".") + m.group(3)

    return _LINK.sub(fix, markdown)
