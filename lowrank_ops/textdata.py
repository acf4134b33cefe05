"""Real English sentences for calibration and evaluation, offline, with no download.

The text is the prose in the docstrings of Python's own standard library, which is on
every machine that has Python. Two disjoint sets are built from two disjoint lists of
modules: the *calibration* set (what compression may look at) and the *evaluation* set
(held out, used only to measure quality). A sentence that happens to occur in both is
dropped from the evaluation set, and disjointness is asserted.

Cleaning: only objects defined in the module itself are read (``obj.__doc__``, never an
inherited docstring); code examples (``>>>``), indented blocks, option lists and reST
markup are skipped; whitespace is collapsed; a sentence is kept when it has 6 to 60 words,
starts with a capital letter, ends with ``.``, ``!`` or ``?`` and is mostly words. The order
is deterministic (module list order, then member names sorted) and duplicates are removed.

    >>> from lowrank_ops.textdata import calibration_sentences, evaluation_sentences
    >>> calib = calibration_sentences(512)
    >>> held_out = evaluation_sentences(256)
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings

__all__ = [
    "CALIBRATION_MODULES",
    "EVALUATION_MODULES",
    "calibration_sentences",
    "evaluation_sentences",
    "available",
]

# Pure-Python standard-library modules present (with prose docstrings) on Python 3.10-3.13.
# None prints, opens windows or starts anything when imported. The two lists share no module.
CALIBRATION_MODULES: tuple[str, ...] = (
    "argparse", "collections", "functools", "json", "json.decoder", "json.encoder", "logging",
    "logging.handlers", "os", "pathlib", "re", "shutil", "subprocess", "textwrap", "typing",
    "unittest.case", "unittest.mock", "email.message", "email.utils", "http.client",
    "http.server", "urllib.request", "urllib.parse", "tarfile", "zipfile", "csv", "datetime",
    "decimal", "_pydecimal", "fractions", "statistics", "random", "numbers", "optparse",
    "getopt", "shlex", "string", "pprint", "reprlib",
)
EVALUATION_MODULES: tuple[str, ...] = (
    "inspect", "pickle", "threading", "multiprocessing.pool", "multiprocessing.connection",
    "asyncio.events", "asyncio.tasks", "asyncio.streams", "asyncio.locks", "asyncio.queues",
    "socket", "ssl", "sqlite3", "xml.dom.minidom", "xml.etree.ElementTree", "configparser",
    "difflib", "doctest", "heapq", "bisect", "calendar", "tempfile", "glob", "fnmatch",
    "gettext", "locale", "codecs", "queue", "sched", "selectors", "smtplib", "imaplib",
    "ftplib", "pdb", "traceback", "warnings", "weakref", "copy", "enum", "dataclasses",
    "contextlib", "abc", "ast", "dis", "tokenize", "platform", "sysconfig", "mailbox",
    "plistlib", "zipimport", "importlib.abc", "importlib.metadata", "timeit", "trace",
)

MIN_WORDS = 6
MAX_WORDS = 60

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[.,;:!?)]*$")
_BAD = re.compile(r"(>>>|\.\.\.|_|[{}\[\]<>=|\\@#$%^*~`]|::|\bhttps?:|\w\(|\w\.\w)")
_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns?|Yields?|Raises|Attributes|Examples?|Notes?|"
    r"Keyword [Aa]rguments|Usage|See [Aa]lso|Warning)\s*:?\s*$"
)


def _docstrings(module_name: str) -> list[str]:
    """Own docstrings of a module, its functions and classes, and the classes' methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when touched
        return _own_docstrings(module_name)


def _own_docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # an optional module (e.g. ssl, sqlite3) missing from this Python build
        return []
    docs = [module.__doc__ or ""]
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: read it where it is defined, if at all
        docs.append(obj.__doc__ or "")
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    docs.append(member.__doc__ or "")
    return [d for d in docs if isinstance(d, str) and d.strip()]


def _prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs of flowing text: no code, no indented blocks, no section headers."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = para.splitlines()
        if not lines:
            continue
        if any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: a code block, an option table or a continuation list
        if any(line.lstrip().startswith((">>>", "...", "- ", "* ", "+", ":", ".. ")) for line in lines):
            continue
        if _SECTION.match(lines[0].strip()) or lines[0].rstrip().endswith("::"):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def _is_sentence(s: str) -> bool:
    words = s.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if not (s[0].isupper() and s[-1] in ".!?"):
        return False
    if _BAD.search(s) or not s.isascii():
        return False
    wordlike = sum(1 for w in words if _WORD.match(w.strip("\"'(")))
    return wordlike >= 0.8 * len(words)


def _sentences(modules: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for module_name in modules:
        for doc in _docstrings(module_name):
            for para in _prose_paragraphs(doc):
                for s in _SENTENCE_END.split(para):
                    s = " ".join(s.split())
                    if _is_sentence(s) and s not in seen:
                        seen.add(s)
                        out.append(s)
    return out


@functools.lru_cache(maxsize=None)
def _sets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    calib = _sentences(CALIBRATION_MODULES)
    calib_set = set(calib)
    evaluation = [s for s in _sentences(EVALUATION_MODULES) if s not in calib_set]
    assert calib_set.isdisjoint(evaluation), "calibration and evaluation sentences overlap"
    return tuple(calib), tuple(evaluation)


def available() -> dict[str, int]:
    """How many calibration and evaluation sentences this Python provides."""
    calib, evaluation = _sets()
    return {"calibration": len(calib), "evaluation": len(evaluation)}


def _take(which: str, sentences: tuple[str, ...], n: int) -> list[str]:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{which}_sentences(n): expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{which}_sentences(n): expected n >= 1, got {n}")
    if n > len(sentences):
        hint = ""
        if not sentences:
            hint = (" (no docstrings found: is Python running with -OO, or is the standard "
                    "library stripped of docstrings?)")
        raise ValueError(
            f"{which}_sentences(n): asked for {n} sentences but only {len(sentences)} "
            f"{which} sentences are available from the standard library docstrings{hint}"
        )
    return list(sentences[:n])


def calibration_sentences(n: int) -> list[str]:
    """The first ``n`` calibration sentences (deterministic; disjoint from evaluation)."""
    return _take("calibration", _sets()[0], n)


def evaluation_sentences(n: int) -> list[str]:
    """The first ``n`` held-out evaluation sentences (deterministic; disjoint from calibration)."""
    return _take("evaluation", _sets()[1], n)
