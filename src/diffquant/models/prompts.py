"""Prompt sets of text-to-image models: text files with one prompt per line.

``model.prompts`` names the file: a path, or ``assets:<relative path>`` for a set shipped with the
package (``assets:prompts/digits.txt``). Sample ``i`` of a job gets prompt ``i % len(prompts)``.

For the papers' Stable Diffusion evaluation, make a captions file from the MS-COCO annotations::

    python -m diffquant.models.prompts coco --annotations captions_val2014.json \\
        --out models/prompts/coco_val2014.txt [--n 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

COCO_COMMAND = "python -m diffquant.models.prompts coco --annotations captions_val2014.json --out <file>"


def prompts_digest(prompts: Sequence[str]) -> str:
    """The first 16 hex digits of the SHA-256 of the prompts (one per line): the prompts decide the
    conditions of every sample, so they are part of a model's identity in cache keys."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def resolve_prompts_path(spec: str) -> Path:
    """``assets:<rel>`` → the packaged file; anything else → that path (``~`` expanded)."""
    if spec.startswith("assets:"):
        return ASSETS_DIR / spec[len("assets:") :]
    return Path(spec).expanduser()


def load_prompts(spec: str | None) -> list[str]:
    """The prompts of ``spec`` (non-empty lines, stripped); fails naming the config key and the fix."""
    if not spec:
        raise ValueError(
            "A text-to-image model needs a prompt set: set model.prompts=<file with one "
            "prompt per line> (e.g. model.prompts=assets:prompts/digits.txt)."
        )
    path = resolve_prompts_path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt file {str(path)!r} (model.prompts={spec!r}) not found. Point model.prompts at a "
            f"file with one prompt per line; for MS-COCO captions make one with: {COCO_COMMAND}"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"Prompt file {str(path)!r} (model.prompts={spec!r}) has no prompts.")
    return prompts


def coco_captions(annotations: Path, n: int | None = None, seed: int = 0) -> list[str]:
    """One caption per image (the first listed) of a COCO ``captions_*.json``, images in id order;
    ``n``: a seeded random subset of that many images, kept in id order."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    first: dict[int, str] = {}
    for ann in data["annotations"]:
        first.setdefault(int(ann["image_id"]), " ".join(ann["caption"].split()))
    ids = sorted(first)
    if n is not None and n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    return [first[i] for i in ids]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.models.prompts",
        description="Make prompt files for text-to-image evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    coco = sub.add_parser("coco", help="captions of MS-COCO images, one per image")
    coco.add_argument("--annotations", type=Path, required=True, help="captions_val2014.json (or 2017)")
    coco.add_argument("--out", type=Path, required=True)
    coco.add_argument("--n", type=int, default=None, help="random subset of images (default: all)")
    coco.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    captions = coco_captions(args.annotations, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(captions) + "\n", encoding="utf-8")
    print(f"wrote {len(captions)} captions to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
