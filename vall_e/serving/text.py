"""Long input -> sentences, each synthesized on its own and joined with a short pause.

The models were trained on single utterances of a few seconds (``max_phones`` bounds them), so a
paragraph read in one AR pass drifts, loops or hits the length guard. Splitting at sentence ends
keeps every pass close to what the model saw in training; a sentence that is still too long is
split again at clause marks, then at spaces.
"""

from __future__ import annotations

import re

# Abbreviations whose period does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "no",
    "fig", "approx", "dept", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
}
# a sentence end: . ! ? or an ellipsis, optionally closed by quotes or brackets, then white space
_END = re.compile(r"""[.!?\u2026]+["'\u201d\u2019)\]]*(?=\s+(\S))""")
_CLAUSE = re.compile(r"(?<=[,;:\u2014])\s+")


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """Sentences of ``text`` in order, none longer than ``max_chars`` (whitespace collapsed).

    Blank lines and line breaks end sentences too (a heading without a period stays apart).

    >>> split_sentences("Hello there. Dr. Smith is in! Is he?")
    ['Hello there.', 'Dr. Smith is in!', 'Is he?']
    """
    out: list[str] = []
    for line in re.split(r"\n\s*\n|\r?\n", text):
        line = " ".join(line.split())
        if not line:
            continue
        pieces, start = [], 0
        for m in _END.finditer(line):
            word = line[:m.start()].rsplit(" ", 1)[-1].lower()
            if m.group(1).islower():  # "wait... what": the sentence goes on
                continue
            if m.group().startswith(".") and (word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", word)):
                continue  # "Dr. Smith", an initial "J. Smith"
            pieces.append(line[start:m.end()].strip())
            start = m.end()
        pieces.append(line[start:].strip())
        for piece in pieces:
            if not any(c.isalnum() for c in piece):  # "..." or "?!" alone has nothing to say
                if out and piece:
                    out[-1] += " " + piece
                continue
            out.extend(_bounded(piece, max_chars))
    return [s for s in out if s]


def _bounded(sentence: str, max_chars: int) -> list[str]:
    """``sentence`` as pieces of at most ``max_chars``: at clause marks first, then at spaces."""
    if len(sentence) <= max_chars:
        return [sentence]
    pieces: list[str] = []
    for clause in _CLAUSE.split(sentence):
        if pieces and len(pieces[-1]) + 1 + len(clause) <= max_chars:
            pieces[-1] += " " + clause
        elif len(clause) <= max_chars:
            pieces.append(clause)
        else:
            words, current = clause.split(" "), ""
            for word in words:
                while len(word) > max_chars:  # one enormous "word": cut it
                    if current:
                        pieces.append(current)
                        current = ""
                    pieces.append(word[:max_chars])
                    word = word[max_chars:]
                if current and len(current) + 1 + len(word) > max_chars:
                    pieces.append(current)
                    current = word
                else:
                    current = f"{current} {word}" if current else word
            if current:
                pieces.append(current)
    return pieces
