"""Extending diffquant from outside ``src/``: a new model family (a tiny DiT, whose denoiser
declares its roles) and a new method (round-to-nearest), registered here and run end to end by
the app, as the README's "Add a model" / "Add a method" sections describe; the built-in methods
run on the new family too, reading its roles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.config_store import ConfigStore

from diffquant.app import run
from diffquant.calib.collect import CalibSettings, collect_calibration
from diffquant.calib.ranges import calibrate_act_ranges, minmax_patterns
from diffquant.methods.base import Method, MethodResult
from diffquant.models.base import Conditioning, DiffusionModel, SamplerSettings
from diffquant.models.denoiser import DiffusersSpec
from diffquant.models.ldm import load_scheduler, vae_class
from diffquant.models.loading import load_component
from diffquant.quant.swap import quantize_denoiser
from diffquant.registry import METHODS, MODELS
from diffquant.schema import ModelConfig, register_configs

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 10


# ---------------------------------------------------------------------------- a model family
class TinyDiTSpec(DiffusersSpec):
    """diffusers ``DiTTransformer2DModel``: latents under ``hidden_states``; the patch embedding
    reads them, ``proj_out_2`` writes the output; the adaLN modulation linears project the
    time-step (+ class) embedding into each block."""

    family = "tiny_dit"
    sample_arg = "hidden_states"
    first_layers = ("pos_embed.proj",)
    last_layers = ("proj_out_2",)

    def resolve(self, denoiser: torch.nn.Module) -> dict[str, list[str]]:
        table = super().resolve(denoiser)
        table["time_projection"] = [
            n for n, _ in denoiser.named_modules() if n.endswith("norm1.linear") or n == "proj_out_1"
        ]
        return table


class TinyDiT(DiffusionModel):
    """Class-conditional latent DiT on the embedded digits autoencoder (random weights)."""

    family = "tiny_dit"
    spec = TinyDiTSpec()

    def conditions(self, indices: Sequence[int], seed: int) -> Conditioning:
        labels = torch.tensor([int(i) % N_CLASSES for i in indices])
        uncond = {"class_labels": torch.full_like(labels, N_CLASSES)} if self.guided else None
        return Conditioning({"class_labels": labels}, uncond, labels.tolist())


def build_tiny_dit(model_cfg: Any, device: torch.device) -> TinyDiT:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=N_CLASSES + 1,
        norm_num_groups=8,
    )
    vae = load_component(vae_class(model_cfg), model_cfg, "vae")
    sampler = SamplerSettings(model_cfg.num_inference_steps, model_cfg.guidance_scale, 0.0)
    return TinyDiT(model_cfg.name, dit, vae, load_scheduler(model_cfg), sampler, (4, 8, 8), None, device)


# ---------------------------------------------------------------------------- a method
@dataclass
class RTNConfig:
    """``method=test_rtn``: round-to-nearest weights on min-max ranges, min-max activation
    ranges from the model's own calibration trajectories."""

    name: str = "test_rtn"
    calib: CalibSettings = field(default_factory=lambda: CalibSettings(n_samples=4, batch_size=4))
    act_rows: int = 32


class RoundToNearest(Method):
    def calibrate(self, model: Any, quant: Any, cfg: RTNConfig, ctx: Any, progress: Path) -> MethodResult:
        stream = collect_calibration(model, cfg.calib, ctx.cache_dir)
        quant = type(quant)(**{**quant.__dict__, "weight_init": "minmax", "act_init": "minmax"})
        summary = quantize_denoiser(model.denoiser, model.spec, quant, model.timesteps)
        calibrate_act_ranges(
            model.denoiser,
            stream,
            method="minmax",
            n_rows=cfg.act_rows,
            minmax_layers=minmax_patterns(model.denoiser, model.spec, quant),
        )
        time_layers = model.spec.layers(model.denoiser, "time_projection")
        return MethodResult(model, quant, {**summary.metrics(), "rtn_time_layers": len(time_layers)})


@pytest.fixture(scope="module")
def registered():
    MODELS.register("tiny_dit")(build_tiny_dit)
    METHODS.register("test_rtn", schema=RTNConfig)(RoundToNearest)
    register_configs()  # stores method/test_rtn_schema
    cs = ConfigStore.instance()
    cs.store(
        group="model",
        name="tiny_dit",
        node=ModelConfig(
            name="tiny_dit",
            family="tiny_dit",
            pretrained="zoo:ldm_digits",
            num_inference_steps=4,
            guidance_scale=2.0,
            num_classes=N_CLASSES,
        ),
    )
    cs.store(group="method", name="test_rtn", node=RTNConfig)
    yield
    MODELS.unregister("tiny_dit")
    METHODS.unregister("test_rtn")


SMALL = ["model=tiny_dit", "evaluator.n_samples=16", "evaluator.batch_size=16", "logger=none"]
FAST_PTQ = [
    "method.calib.n_samples=4",
    "method.calib.batch_size=4",
    "method.act_init_rows=32",
    "method.recon.weight_iters=4",
    "method.recon.act_iters=2",
    "method.recon.batch_size=8",
]


def n_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())


def test_new_family_and_new_method_run_end_to_end(registered, make_cfg):
    cfg = make_cfg([*SMALL, "quant=w8a8", "method=test_rtn"])
    metrics = run(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["model"] == "tiny_dit" and on_disk["method"] == "test_rtn"
    dit = build_tiny_dit(cfg.model, torch.device("cpu")).denoiser
    assert metrics["n_quant_layers"] == n_layers(dit) == 21
    assert metrics["rtn_time_layers"] == 3  # two blocks' adaLN linears and proj_out_1
    assert metrics["test_rtn_cached"] is False and metrics["fid_to_fp"] >= 0.0
    again = run(make_cfg([*SMALL, "quant=w8a8", "method=test_rtn"], name="again"))
    assert again["test_rtn_cached"] is True and again["fid_to_fp"] == metrics["fid_to_fp"]


def test_roles_of_the_new_family_resolve(registered, make_cfg):
    model = build_tiny_dit(make_cfg(SMALL).model, torch.device("cpu"))
    spec, dit = model.spec, model.denoiser
    assert spec.layers(dit, "first", "last") == ["pos_embed.proj", "proj_out_2"]
    assert spec.layers(dit, "self_attention_qkv") == [
        f"transformer_blocks.{b}.attn1.to_{p}" for b in (0, 1) for p in "qkv"
    ]
    assert spec.layers(dit, "feed_forward") == [
        f"transformer_blocks.{b}.ff.net.{p}" for b in (0, 1) for p in ("0.proj", "2")
    ]
    assert spec.layers(dit, "cross_attention_q") == [] and spec.shortcut_splits(dit) == {}
    assert len(spec.layers(dit, "time_embedding")) == 4  # each block's timestep MLP


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ptq", FAST_PTQ),
        (
            "quest",
            [f"method.ptq.{o[len('method.') :]}" for o in FAST_PTQ]
            + [
                "method.tla_epochs=1",
                "method.cma_epochs=1",
                "method.samples_per_step=8",
                "method.batch_size=8",
                "method.timestep_init_rows=32",
                "method.eval_rows=8",
                "method.guard_samples=4",
            ],
        ),
    ],
)
def test_builtin_methods_run_on_the_new_family_through_its_roles(registered, make_cfg, method, extra):
    metrics = run(make_cfg([*SMALL, "quant=w4a8", f"method={method}", *extra]))
    assert metrics["n_quant_layers"] == 21
    if method == "ptq":  # the two transformer blocks are units; the other 3 layers their own
        assert metrics["recon_units"] == 2 + 3
    else:  # TLA trains the declared time projections, CMA the self-attention q/k/v (default)
        assert metrics["tla_n_layers"] == 3 and metrics["cma_n_layers"] == 6


# ---------------------------------------------------------------------------- the README, as written
def readme_blocks(section: str) -> dict[str, str]:
    """The fenced code blocks of a README section, by language."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {lang: code for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, re.S)}


def test_readme_add_a_method_runs_as_written(make_cfg):
    import sys
    import types

    from omegaconf import OmegaConf

    blocks = readme_blocks("Add a method")
    module = types.ModuleType("readme_my_method")  # as if it were src/diffquant/methods/my_method.py
    sys.modules[module.__name__] = module
    exec(compile(blocks["python"], "README.md#add-a-method", "exec"), module.__dict__)  # noqa: S102
    try:
        register_configs()
        ConfigStore.instance().store(group="method", name="my_method", node=OmegaConf.create(blocks["yaml"]))
        metrics = run(
            make_cfg(
                [
                    "evaluator.n_samples=16",
                    "evaluator.batch_size=16",
                    "logger=none",
                    "quant=w8a8",
                    "method=my_method",
                    "method.calib.n_samples=4",
                    "method.calib.batch_size=4",
                    "method.act_rows=32",
                ]
            )
        )
        assert metrics["method"] == "my_method" and metrics["my_method_cached"] is False
        assert metrics["my_attn_layers"] == 12  # ldm_digits' self-attention q, k, v
    finally:
        METHODS.unregister("my_method")
        sys.modules.pop(module.__name__, None)
