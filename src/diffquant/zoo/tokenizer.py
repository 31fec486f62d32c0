"""The vocabulary of the embedded text models: a byte-pair encoding learned on the digit captions.

The files are those of OpenAI's CLIP tokenizer (``vocab.json`` + ``merges.txt``), so the folder
loads with ``transformers.CLIPTokenizer`` like Stable Diffusion's. The vocabulary is

* the 256 byte symbols of CLIP's byte-level alphabet, alone and with the end-of-word mark
  ``</w>`` (any text tokenizes; unseen words fall back to pieces);
* the merges learned on the caption corpus until every word of it is one token;
* ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in Stable Diffusion).

Building it is deterministic (ties between pair counts break alphabetically).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers.models.clip.tokenization_clip import bytes_to_unicode

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenization of lower-case ASCII text: letter runs, single digits, punctuation runs.
_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def words_of(text: str) -> list[str]:
    """The pre-tokenized words of ``text`` (lower-cased), as CLIP splits ASCII text."""
    return _WORD_PATTERN.findall(text.lower())


def _symbols(word: str) -> tuple[str, ...]:
    """A word as byte symbols, the last one carrying the end-of-word mark."""
    byte_symbol = bytes_to_unicode()
    chars = [byte_symbol[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def learn_merges(corpus: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``corpus`` until every word is a single symbol, in merge order."""
    word_counts = Counter(w for text in corpus for w in words_of(text))
    words = {_symbols(w): n for w, n in word_counts.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge(symbols, best): n for symbols, n in words.items()}


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token → id: byte symbols, byte symbols + ``</w>``, merged tokens, then the two special tokens."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [s + END_OF_WORD for s in alphabet] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def save_tokenizer(corpus: Iterable[str], out_dir: Path, max_length: int):
    """Learn the vocabulary on ``corpus``, write it to ``out_dir`` and return the loaded ``CLIPTokenizer``
    (``model_max_length`` = ``max_length`` tokens, start and end tokens included)."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(corpus)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(build_vocab(merges), ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(vocab_file), str(merges_file), model_max_length=max_length, pad_token=EOS_TOKEN
    )
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)
