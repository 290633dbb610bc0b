"""The real text the language family is trained and scored on: found inside installed wheels, read offline.

Every corpus is text written by people that ships in a PyPI wheel (the `lang` extra pins them):

| corpus | package (version) | path inside the package | what it is |
|---|---|---|---|
| wiki | gensim 4.4.0 | test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 | English Wikipedia articles (wiki markup), 6.1 MB |
| text8 | gensim 4.4.0 | test/test_data/head500.noblanks.cor | the text8 Wikipedia dump's first 500 lines (lowercase, no punctuation), 2.3 MB |
| news | gensim 4.4.0 | test/test_data/lee_background.cor | the Lee corpus: 300 Australian news articles |
| usenet | gensim 4.4.0 | test/test_data/mini_newsgroup | 200 messages of 20 Newsgroups (alt.atheism, sci.space), a zlib'd pickle read by a restricted unpickler |
| analogy | gensim 4.4.0 | test/test_data/questions-words.txt | Mikolov's word-analogy questions with their 14 relation sections |
| sentiment | gensim 4.4.0 | test/test_data/pang_lee_polarity.cor | 200 movie-review sentences labelled positive / negative (Pang & Lee) |
| code | Django 5.2.20 | django/**/*.py | Django's Python source |
| translations, langid | Django 5.2.20 | django/**/locale/LANG/LC_MESSAGES/django.po | Django's UI strings translated by people into ~100 languages (msgstr entries) |
| names | Faker 40.54.0 | faker/providers/person/LOCALE/ | real first and last names per locale, drawn with Faker's seeded generator |

Nothing is downloaded: a missing package is a one-line error naming the pip command.
"""
from __future__ import annotations

import ast
import bz2
import copyreg
import importlib.util
import io
import pickle
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

SOURCES = {
    "gensim": "gensim==4.4.0",
    "django": "Django==5.2.20",
    "faker": "Faker==40.54.0",
}
INSTALL_HINT = "pip install torch==2.13.0 -e '.[lang]'"


class MissingCorpus(RuntimeError):
    """A package holding a corpus is not installed (the message is one line naming the fix)."""


def package_root(name: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingCorpus(f"the language benchmark needs {SOURCES[name]} (its bundled text): {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def gensim_file(name: str) -> Path:
    path = package_root("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise MissingCorpus(f"{path} is missing: the language benchmark needs {SOURCES['gensim']}: {INSTALL_HINT}")
    return path


# --------------------------------------------------------------------------- plain documents


def wiki_documents() -> list[str]:
    """Wikipedia articles: the <text> of each <page>, markup kept, entities unescaped."""
    xml = bz2.decompress(gensim_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2").read_bytes())
    texts = re.findall(r"<text[^>]*>(.*?)</text>", xml.decode("utf-8"), flags=re.S)
    unescape = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&amp;": "&"}
    out = []
    for text in texts:
        for k, v in unescape.items():
            text = text.replace(k, v)
        if len(text) > 200:
            out.append(text)
    return out


def text8_documents() -> list[str]:
    return [line.strip() for line in gensim_file("head500.noblanks.cor").read_text("utf-8").splitlines() if line.strip()]


def news_documents() -> list[str]:
    return [line.strip() for line in gensim_file("lee_background.cor").read_text("utf-8").splitlines() if line.strip()]


class _Bunch(dict):
    """Stands for scikit-learn's Bunch: the pickle only sets its __dict__/items."""


class _NewsgroupUnpickler(pickle.Unpickler):
    """Allows only the few plain classes the file names; any other global is refused (nothing else runs)."""

    def find_class(self, module, name):
        import numpy as np
        from numpy._core.multiarray import _reconstruct
        allowed = {("copy_reg", "_reconstructor"): copyreg._reconstructor, ("__builtin__", "dict"): dict,
                   ("__builtin__", "object"): object, ("sklearn.datasets.base", "Bunch"): _Bunch,
                   ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): np.ndarray,
                   ("numpy", "dtype"): np.dtype}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in mini_newsgroup")
        return allowed[(module, name)]


def usenet_documents() -> list[str]:
    """Each message's Subject line and body (routing headers dropped)."""
    raw = zlib.decompress(gensim_file("mini_newsgroup").read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    data = bunch["data"] if isinstance(bunch, dict) and "data" in bunch else bunch.__dict__["data"]
    out = []
    for message in data:
        head, _, body = message.partition("\n\n")
        subject = next((h for h in head.splitlines() if h.startswith("Subject:")), "")
        out.append((subject + "\n" + body).strip())
    return out


def code_documents(max_chars: int = 1_500_000) -> list[str]:
    """Django's .py files (non-empty), a seeded sample of files up to max_chars."""
    root = package_root("django")
    files = sorted(p for p in root.glob("**/*.py") if "locale" not in p.parts)
    random.Random(0).shuffle(files)
    out, total = [], 0
    for p in files:
        text = p.read_text("utf-8", errors="replace")
        if len(text) < 300:
            continue
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def po_strings(lang: str) -> list[str]:
    """The translated msgstr entries of every Django .po catalogue of one language (plural forms included)."""
    root = package_root("django")
    out = []
    for path in sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/django.po")):
        entries = path.read_text("utf-8", errors="replace").split("\n\n")
        for entry in entries[1:]:  # the first entry is the catalogue's header
            for block in re.findall(r'msgstr(?:\[\d\])? ((?:".*"\n?)+)', entry + "\n"):
                text = "".join(ast.literal_eval(s) for s in re.findall(r'"(?:[^"\\]|\\.)*"', block))
                text = text.strip()
                if text:
                    out.append(text)
    return out


def translation_documents(langs=("de", "fr", "es", "it"), per_doc: int = 40) -> list[str]:
    """Django's translated strings in a few languages, grouped into documents of per_doc entries."""
    out = []
    for lang in langs:
        strings = po_strings(lang)
        out += ["\n".join(strings[i:i + per_doc]) for i in range(0, len(strings), per_doc)]
    return out


# --------------------------------------------------------------------------- labelled examples


def langid_examples(langs) -> list[tuple[str, str]]:
    """(translated UI string, language) from Django's catalogues; strings of 12+ characters, deduplicated."""
    out, seen = [], set()
    for lang in langs:
        for s in po_strings(lang):
            s = " ".join(s.split())
            if len(s) >= 12 and (s, lang) not in seen:
                seen.add((s, lang))
                out.append((s, lang))
    return out


def name_examples(locales, per_locale: int) -> list[tuple[str, str]]:
    """(first + last name, locale) drawn by Faker with a fixed seed; names unique across locales."""
    try:
        from faker import Faker
    except ImportError as exc:
        raise MissingCorpus(f"the language benchmark needs {SOURCES['faker']} (its name lists): {INSTALL_HINT}") from exc
    out, seen = [], set()
    for locale in locales:
        fake = Faker(locale)
        fake.seed_instance(0)
        names = []
        for _ in range(per_locale * 4):
            name = f"{fake.first_name()} {fake.last_name()}"
            if name not in seen:
                seen.add(name)
                names.append(name)
            if len(names) == per_locale:
                break
        out += [(n, locale) for n in names]
    return out


ANALOGY_SECTIONS = {"capital-common-countries": "capital", "capital-world": "capital", "currency": "currency",
                    "city-in-state": "state", "family": "family", "gram1-adjective-to-adverb": "adverb",
                    "gram2-opposite": "opposite", "gram3-comparative": "comparative",
                    "gram4-superlative": "superlative", "gram5-present-participle": "participle",
                    "gram6-nationality-adjective": "nationality", "gram7-past-tense": "past",
                    "gram8-plural": "plural", "gram9-plural-verbs": "verbs"}


def analogy_examples() -> list[tuple[str, str]]:
    """(four-word analogy question, its relation), lowercased."""
    out, label = [], None
    for line in gensim_file("questions-words.txt").read_text("utf-8").splitlines():
        if line.startswith(":"):
            label = ANALOGY_SECTIONS[line[1:].strip()]
        elif line.strip():
            out.append((line.strip().lower(), label))
    return out


def sentiment_examples() -> list[tuple[str, str]]:
    out = []
    for line in gensim_file("pang_lee_polarity.cor").read_text("cp1252", errors="replace").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            out.append((text.strip(), label.replace("__label__", "")))
    return out


# --------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "generative" or "classification"
    source: str  # where its text comes from (package, path)


TASKS = {
    "news": Task("news", "generative", "gensim 4.4.0 test/test_data/lee_background.cor"),
    "code": Task("code", "generative", "Django 5.2.20 django/**/*.py"),
    "translations": Task("translations", "generative", "Django 5.2.20 django/**/locale/{de,fr,es,it}/LC_MESSAGES/django.po"),
    "usenet": Task("usenet", "generative", "gensim 4.4.0 test/test_data/mini_newsgroup"),
    "langid": Task("langid", "classification", "Django 5.2.20 django/**/locale/{nl,pl,sv,pt_BR,cs,tr,hu,fi}/LC_MESSAGES/django.po"),
    "names": Task("names", "classification", "Faker 40.54.0 faker/providers/person/{de_DE,fr_FR,es_ES,it_IT,pl_PL,nl_NL,sv_SE,tr_TR}"),
    "analogy": Task("analogy", "classification", "gensim 4.4.0 test/test_data/questions-words.txt"),
    "sentiment": Task("sentiment", "classification", "gensim 4.4.0 test/test_data/pang_lee_polarity.cor"),
}
LANGID_LANGS = ("nl", "pl", "sv", "pt_BR", "cs", "tr", "hu", "fi")
NAME_LOCALES = ("de_DE", "fr_FR", "es_ES", "it_IT", "pl_PL", "nl_NL", "sv_SE", "tr_TR")


def generative_documents(task: str) -> list[str]:
    return {"news": news_documents, "code": code_documents, "translations": translation_documents,
            "usenet": usenet_documents}[task]()


def classification_examples(task: str) -> list[tuple[str, str]]:
    if task == "langid":
        return langid_examples(LANGID_LANGS)
    if task == "names":
        return name_examples(NAME_LOCALES, 600)
    if task == "analogy":
        return analogy_examples()
    if task == "sentiment":
        return sentiment_examples()
    raise KeyError(task)


def pretraining_documents() -> list[str]:
    """The base model's mixture besides the tasks' training documents: Wikipedia markup and text8."""
    return wiki_documents() + text8_documents()
