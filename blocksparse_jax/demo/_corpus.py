"""The demo's corpus: discovery, a regex tokenizer, the vocabulary and the splits.

The default corpus is the Python standard library's own source (found through
``sysconfig``), without its test suites: every Python installation has it,
and it is a real large-vocabulary text (about 2.8 million tokens, more than 50,000
distinct identifiers, numbers and symbols).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys
import sysconfig

import numpy as np

UNK = "<unk>"
NEWLINE = "\n"

#: Identifiers (also the words of strings and comments), numbers (``0x1f``,
#: ``1.5e3`` in one piece), multi-character operators, any other single symbol,
#: and one newline token per non-blank line.  Whitespace is dropped.
_TOKEN_RE = re.compile(
    r"\n(?![ \t\r\f\v]*\n)"
    r"|[^\W\d]\w*"
    r"|\d[\w.]*"
    r"|\*\*=?|//=?|->|<<=?|>>=?|[-+*/%&|^@<>=!:]=|\.\.\."
    r"|\S"
)

#: Directory names that are never part of the standard-library corpus: test
#: suites (``test/``, ``tests/``, ``idlelib/idle_test``, ``lib2to3/tests``...),
#: installed third-party packages and caches.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)

#: Every ``VAL_EVERY``-th file (in sorted order) is held out for validation.
VAL_EVERY = 10


class CorpusError(ValueError):
    """A corpus or vocabulary that the demo cannot train on (a user error)."""


def tokenize(text: str) -> list[str]:
    """Splits source text into identifiers, numbers, operators, symbols and newlines."""
    return _TOKEN_RE.findall(text)


def detokenize(tokens: list[str]) -> str:
    """A readable rendering: tokens separated by spaces, newlines kept."""
    return " ".join(tokens).replace(" \n ", "\n").replace("\n ", "\n").replace(" \n", "\n")


def stdlib_files() -> tuple[str, list[str]]:
    """The standard library's ``.py`` files without test suites, in a deterministic order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return root, files


def display_path(path: str) -> str:
    """An absolute ``path`` under the home directory as ``~/...``; others as given."""
    home = os.path.expanduser("~")
    if not os.path.isabs(path) or home in ("~", os.sep):
        return path
    full = os.path.normpath(path)
    if os.path.commonpath([full, home]) != home:
        return path
    rel = os.path.relpath(full, home)
    return "~" if rel == "." else os.path.join("~", rel)


def stdlib_description(root: str) -> str:
    """``the Python 3.11 standard library (sys.prefix/lib/python3.11, ...)``: no home path."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix_name = "sys.prefix" if sys.prefix == sys.base_prefix else "sys.base_prefix"
    prefix = os.path.abspath(sys.base_prefix)
    full = os.path.abspath(root)
    if os.path.commonpath([full, prefix]) == prefix:
        where = "/".join([prefix_name, *os.path.relpath(full, prefix).split(os.sep)])
    else:
        where = display_path(root)
    return f"the Python {version} standard library ({where}, without test suites)"


def text_files(path: str) -> list[str]:
    """``[path]`` for a file, or every non-hidden regular file under a folder, sorted.

    Devices, pipes, sockets and broken links inside a folder are skipped.

    Raises:
      CorpusError: ``path`` is missing, a broken link, not a regular file or a
        folder, or a folder that cannot be listed.
    """
    where = f"--text {display_path(path)!r}"
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        if os.path.lexists(path) and not os.path.exists(path):
            raise CorpusError(f"{where} is a symbolic link to a missing file")
        if os.path.exists(path):
            raise CorpusError(
                f"{where} is not a regular file or a folder (a device, pipe or socket); "
                "give a text file or a folder of them"
            )
        raise CorpusError(f"{where}: no such file or folder")

    def unreadable(e: OSError):
        raise CorpusError(
            f"{where}: cannot list the folder {display_path(e.filename or path)!r} ({e.strerror})"
        )

    files = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            f
            for f in (os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith("."))
            if os.path.isfile(f)
        )
    return files


def _read_text(path: str, *, strict: bool) -> str | None:
    """The file's text, or None for a file that is not UTF-8 text (when not ``strict``)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        option = "" if strict else "--text: "
        raise CorpusError(f"{option}cannot read {display_path(path)!r} ({e.strerror})") from None
    if strict:
        return data.decode("utf-8", errors="replace")
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Index(dict):
    """Token -> id; a token outside the vocabulary is ``<unk>`` (id 0)."""

    def __missing__(self, key):
        return 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus split into training and validation token-id arrays.

    Attributes:
      source: a description of where the text came from.
      n_files: files read.
      n_skipped: files skipped because they are not UTF-8 text.
      split: ``"by file"`` or ``"by position"`` (the last tenth of the tokens).
      vocab: ``(vocab_size,)`` tokens; ``vocab[0]`` is ``<unk>``, the rest by
        decreasing training frequency.
      counts: ``(vocab_size,)`` int64 training counts (``<unk>``: the tokens it replaces).
      train, val: int32 token ids.
      n_distinct: distinct tokens in the training split.
    """

    source: str
    n_files: int
    n_skipped: int
    split: str
    vocab: list[str]
    counts: np.ndarray
    train: np.ndarray
    val: np.ndarray
    n_distinct: int

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: list[str]) -> np.ndarray:
        """Token ids (0 for tokens outside the vocabulary)."""
        lookup = _Index((t, i) for i, t in enumerate(self.vocab)).__getitem__
        return np.fromiter(map(lookup, tokens), dtype=np.int32, count=len(tokens))


def load_corpus(text: str | None, *, vocab_size: int | None = None, min_count: int = 2) -> Corpus:
    """Reads, tokenizes and splits a corpus and builds its vocabulary.

    Args:
      text: a UTF-8 file or a folder of them; None for the standard library.
      vocab_size: the size of the vocabulary including ``<unk>``: the
        ``vocab_size - 1`` most frequent training tokens.  None: every token seen
        at least ``min_count`` times in the training split.
      min_count: see ``vocab_size``.

    Returns:
      The ``Corpus``.

    Raises:
      CorpusError: a missing path, no text, or a split without tokens.
    """
    if text is None:
        root, files = stdlib_files()
        source = stdlib_description(root)
        strict = True
    else:
        files = text_files(text)
        source = display_path(text)
        strict = False
    docs, skipped = [], 0
    for f in files:
        s = _read_text(f, strict=strict)
        if s is None:
            skipped += 1
            continue
        toks = tokenize(s)
        if len(toks) > toks.count(NEWLINE):  # not blank
            docs.append(toks)
    if not docs:
        if text is None:
            raise CorpusError(
                f"{source}: no Python source found (is the standard library installed "
                "without its .py files?); give a text with --text PATH"
            )
        what = "UTF-8 text" if skipped else "tokens"
        where = f"--text {display_path(text)!r}"
        if not files:
            raise CorpusError(f"{where}: the corpus is empty (a folder without files)")
        if len(files) == 1 and os.path.getsize(files[0]) == 0:
            raise CorpusError(f"{where}: the corpus is empty (an empty file)")
        raise CorpusError(f"{where}: the corpus is empty (no {what} found)")

    if len(docs) >= VAL_EVERY:
        split = "by file"
        train_toks = [t for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY // 2 for t in d]
        val_toks = [t for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY // 2 for t in d]
    else:
        split = "by position"
        all_toks = [t for d in docs for t in d]
        cut = len(all_toks) - len(all_toks) // VAL_EVERY
        train_toks, val_toks = all_toks[:cut], all_toks[cut:]

    counter = collections.Counter(train_toks)
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    if vocab_size is None:
        kept = [kv for kv in ranked if kv[1] >= min_count]
    else:
        kept = ranked[: max(vocab_size - 1, 0)]
    vocab = [UNK] + [t for t, _ in kept]
    n_unk = len(train_toks) - sum(c for _, c in kept)
    counts = np.array([n_unk] + [c for _, c in kept], dtype=np.int64)
    lookup = _Index((t, i) for i, t in enumerate(vocab)).__getitem__
    train = np.fromiter(map(lookup, train_toks), dtype=np.int32, count=len(train_toks))
    val = np.fromiter(map(lookup, val_toks), dtype=np.int32, count=len(val_toks))
    return Corpus(
        source=source,
        n_files=len(docs),
        n_skipped=skipped,
        split=split,
        vocab=vocab,
        counts=counts,
        train=train,
        val=val,
        n_distinct=len(counter),
    )


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities from training counts."""
    c = counts.astype(np.float64) + 1.0
    return np.log(c / c.sum())
