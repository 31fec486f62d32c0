"""Loading diffusers components from a hub id, a local folder or the embedded zoo.

Every model, embedded or real, goes through :func:`load_component`, i.e. diffusers'
``from_pretrained(location, subfolder=...)``. ``zoo:<name>`` names a folder shipped inside the
package (``diffquant/zoo/weights/<name>``). Missing weights fail before any work, with a message
naming the command that downloads or converts them and the config key of a local path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo" / "weights"


class MissingWeightsError(FileNotFoundError):
    """The weights of a model or evaluator are not on this machine."""


class CorruptWeightsError(OSError):
    """The weights of a model are on this machine but cannot be read."""


def resolve_location(pretrained: str) -> str:
    """``zoo:<name>`` → the packaged folder; anything else (hub id or path) unchanged."""
    if pretrained.startswith("zoo:"):
        return str(ZOO_DIR / pretrained[4:])
    return pretrained


def is_local(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~")) or Path(location).expanduser().exists()


def missing_weights_message(model_cfg: Any, location: str, detail: str = "") -> str:
    lines = [f"Weights of model '{model_cfg.name}' not found at {location!r}."]
    if detail:
        lines.append(f"  ({detail})")
    if model_cfg.get_weights:
        lines.append(f"  Get them with: {model_cfg.get_weights}")
    lines.append(
        "  Then point the config at them: model.pretrained=/path/to/diffusers/folder"
        " (or set model.local_files_only=false on a machine with internet access to use a"
        " hub id)."
    )
    return "\n".join(lines)


def check_weights(model_cfg: Any, subfolders: tuple[str, ...]) -> str:
    """Fail fast (before any work) when a local folder lacks a component; returns the location."""
    location = resolve_location(model_cfg.pretrained)
    if is_local(location) or model_cfg.pretrained.startswith("zoo:"):
        root = Path(location).expanduser()
        absent = [s for s in subfolders if not (root / s).is_dir()]
        if absent:
            raise MissingWeightsError(
                missing_weights_message(
                    model_cfg, location, f"missing component folders: {', '.join(absent)}"
                )
            )
    elif model_cfg.local_files_only:
        from huggingface_hub import try_to_load_from_cache

        probe = try_to_load_from_cache(location, f"{subfolders[0]}/config.json", revision=model_cfg.revision)
        if not isinstance(probe, str):
            raise MissingWeightsError(
                missing_weights_message(
                    model_cfg, location, "not in the local Hugging Face cache and model.local_files_only=true"
                )
            )
    return location


def load_component(cls: type, model_cfg: Any, subfolder: str, **kwargs: Any):
    """``cls.from_pretrained(location, subfolder=subfolder)`` with the config's offline policy."""
    location = resolve_location(model_cfg.pretrained)
    try:
        return cls.from_pretrained(
            location,
            subfolder=subfolder,
            revision=model_cfg.revision,
            local_files_only=model_cfg.local_files_only,
            **kwargs,
        )
    except OSError as err:
        folder = Path(location).expanduser() / subfolder
        weights = [f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin", ".pt")]
        if weights and "Unable to load weights" in str(err):
            raise CorruptWeightsError(
                f"Weights of model '{model_cfg.name}' at {folder} exist but cannot be read "
                f"({str(err).splitlines()[0]}): the file is corrupt or truncated. Re-download or "
                "retrain them" + (f" ({model_cfg.get_weights})" if model_cfg.get_weights else "") + "."
            ) from err
        raise MissingWeightsError(
            missing_weights_message(model_cfg, location, str(err).splitlines()[0])
        ) from err


def read_meta(model_cfg: Any) -> dict[str, Any]:
    """The optional ``diffquant.json`` beside the components (embedded models write one)."""
    location = Path(resolve_location(model_cfg.pretrained)).expanduser()
    meta = location / "diffquant.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class NonFiniteWeightsError(ValueError):
    """A loaded component holds NaN or inf weights."""


def check_finite_weights(model: Any, model_cfg: Any) -> None:
    """Fail before any work when a component's weights hold NaN/inf, naming the first such
    parameter (sampling would turn it into NaN images and cached NaN references)."""
    for component in ("denoiser", "vae", "text_encoder"):
        module = getattr(model, component, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                n_bad = int((~torch.isfinite(p)).sum())
                raise NonFiniteWeightsError(
                    f"model '{model_cfg.name}' ({model_cfg.pretrained}): {component} parameter "
                    f"{name!r} holds {n_bad} NaN/inf value(s) of {p.numel()}. The weights are "
                    "corrupt: re-download or retrain them"
                    + (f" ({model_cfg.get_weights})" if model_cfg.get_weights else "")
                    + "."
                )


def build_model(model_cfg: Any, device: torch.device | str = "cpu"):
    """Build the wrapper of ``model_cfg.family`` from the MODELS registry; its weights are
    checked finite (:func:`check_finite_weights`)."""
    from diffquant.registry import MODELS

    model = MODELS.get(model_cfg.family)(model_cfg, torch.device(device))
    check_finite_weights(model, model_cfg)
    return model
