"""Captions of the digits: the phrasings the embedded text-to-image models are trained and sampled with.

Every caption names one digit class (0..9) in one of :data:`TEMPLATES`, either by its word
("a handwritten seven") or by its numeral ("the digit 7"). The training runs of
:mod:`diffquant.zoo.train_sd` draw a random template per image; the evaluation prompt set
``assets/prompts/digits.txt`` lists the first :data:`PROMPT_TEMPLATES` templates for every digit,
template-major, so that any 10 consecutive prompts cover the 10 classes once.
"""

from __future__ import annotations

from pathlib import Path

#: Digit words, indexed by class.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Phrasings; ``{word}`` is the digit's word, ``{n}`` its numeral.
TEMPLATES = (
    "a handwritten {word}",
    "the digit {n}",
    "a handwritten digit {n}",
    "the number {word}",
    "a drawing of the digit {word}",
    "{word}",
    "an image of a handwritten {n}",
    "a {word} written by hand",
)

#: How many templates the evaluation prompt set uses (5 × 10 digits = 50 prompts).
PROMPT_TEMPLATES = 5

#: The packaged evaluation prompt set.
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "prompts" / "digits.txt"


def caption(label: int, template: int) -> str:
    """The caption of class ``label`` (0..9) in phrasing ``template`` (index into :data:`TEMPLATES`)."""
    return TEMPLATES[template].format(word=DIGIT_WORDS[label], n=label)


def all_captions() -> list[list[str]]:
    """Every caption: ``[label][template]`` (10 × len(TEMPLATES) strings)."""
    return [[caption(label, t) for t in range(len(TEMPLATES))] for label in range(len(DIGIT_WORDS))]


def prompt_lines() -> list[str]:
    """The evaluation prompts: line ``k`` is class ``k % 10`` in template ``k // 10``."""
    return [caption(label, t) for t in range(PROMPT_TEMPLATES) for label in range(len(DIGIT_WORDS))]


def label_of(text: str) -> int | None:
    """The class a caption names (its digit word or numeral), or None if it names none."""
    for token in text.lower().replace(",", " ").split():
        if token in DIGIT_WORDS:
            return DIGIT_WORDS.index(token)
        if token.isdigit() and len(token) == 1:
            return int(token)
    return None


def write_prompts_file(path: Path = PROMPTS_FILE) -> Path:
    """Write :func:`prompt_lines` to ``path``, one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompt_lines()) + "\n")
    return path
