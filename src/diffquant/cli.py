"""Command-line help that Hydra does not give: a misspelt key names the closest valid key.

Hydra rejects ``quant.wieght_bits=4`` with "Could not override 'quant.wieght_bits'. To append to
your config use +quant.wieght_bits=4", which is wrong advice for a schema-checked config.
:func:`misspelt_key_message` composes the command line's overrides once (each sweep parameter at
its first value) and, when a key does not exist, returns a message naming the closest valid keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

_KEY_ERROR = re.compile(r"Could not override '([^']+)'")


def _first_values(overrides: Sequence[str]) -> list[str]:
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and "," in value and not value.lstrip().startswith(("[", "{", "'", '"')):
            value = value.split(",", 1)[0]
        out.append(f"{key}{sep}{value}")
    return out


def misspelt_key_message(overrides: Sequence[str], config_dir: Path) -> Optional[str]:
    """None when the overrides compose (or fail for another reason: Hydra reports those), else
    one line per unknown key: ``Unknown config key '<key>'. Did you mean <closest>?``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    args = [o for o in _first_values(overrides) if not o.startswith(("hydra", "+", "~", "-"))]
    bad: list[str] = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            while True:
                try:
                    cfg = compose(config_name="config", overrides=args)
                    break
                except ConfigCompositionException as err:
                    match = _KEY_ERROR.search(str(err))
                    if match is None:
                        return None
                    bad.append(match[1])
                    args = [a for a in args if not a.startswith(f"{match[1]}=")]
                except Exception:  # anything else is Hydra's to report, with its own message
                    return None
    finally:
        GlobalHydra.instance().clear()
    lines = []
    for key in bad:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        names = [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []
        close = difflib.get_close_matches(leaf, names, n=2)
        where = f"{parent}." if parent else ""
        hint = (
            f" Did you mean {' or '.join(where + c for c in close)}?"
            if close
            else f" Valid keys of {parent or 'the config'}: {', '.join(names)}."
        )
        lines.append(f"Unknown config key {key!r}.{hint}")
    return "\n".join(lines) or None
