"""ModelOpt and Quanto as methods (optional extra ``toolkits``): they quantize the denoiser through
the project's calibration rows, state what they quantized, and refuse bit-widths they have no
configuration for, and a missing library, before any work."""

import importlib.util

import pytest
import torch

from diffquant.calib import CalibSettings
from diffquant.context import RunContext
from diffquant.methods import toolkits
from diffquant.methods.result_cache import run_method
from diffquant.methods.toolkits import ModelOptConfig, QuantoConfig
from diffquant.quant import QuantConfig
from diffquant.quant.size import model_size_mb
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config
from diffquant.validation import ConfigError, InvalidSetting
from tiny_models import TinyDiffusion, unet2d_inputs

torch.set_num_threads(1)

CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4)
W8A8 = QuantConfig(name="w8a8", weight_bits=8, act_bits=8)
W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)


def _ctx(tmp_path):
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))


@pytest.mark.parametrize(
    "name, module, cfg",
    [
        ("modelopt", "modelopt", ModelOptConfig(calib=CALIB, calib_batch_size=8)),
        ("quanto", "optimum.quanto", QuantoConfig(calib=CALIB, calib_batch_size=8)),
    ],
)
def test_toolkit_quantizes_the_denoiser_and_states_what(name, module, cfg, tmp_path):
    pytest.importorskip(module)
    x = unet2d_inputs(4)
    fp = TinyDiffusion()
    with torch.no_grad():
        ref = fp.denoiser(**x).sample
    model = TinyDiffusion()
    result = run_method(METHODS.get(name)(), model, W8A8, cfg, _ctx(tmp_path))
    with torch.no_grad():
        out = model.denoiser(**x).sample
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < rel < 1e-2  # quantized (not the FP model), and 8-bit close
    ops = result.metrics["quantized_ops"]
    assert "Conv2d" in ops and "Linear" in ops and "attention matmuls FP" in ops
    assert result.metrics["calib_rows"] > 0
    # INT8 weights: about a quarter of the FP32 size
    assert result.metrics["model_size_mb"] < 0.4 * model_size_mb(fp.denoiser)


def test_modelopt_w4a8_preset_counts_its_int4_weights(tmp_path):
    pytest.importorskip("modelopt")
    fp = TinyDiffusion()
    model = TinyDiffusion()
    w4a8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
    cfg = ModelOptConfig(calib=CALIB, calib_batch_size=8)
    result = run_method(METHODS.get("modelopt")(), model, w4a8, cfg, _ctx(tmp_path))
    assert result.metrics["quantized_ops"].startswith("ModelOpt W4A8_AWQ_BETA_CFG")
    # INT4 codes, plus one 32-bit scale per block of the last weight axis (a conv's kernel row)
    assert result.metrics["model_size_mb"] < 0.5 * model_size_mb(fp.denoiser)


def test_bit_widths_without_a_configuration_are_refused_before_work(make_cfg):
    with pytest.raises(InvalidSetting, match="quant=w8a8 or quant=w4a8"):
        METHODS.get("modelopt").check_bits(W4A4, ModelOptConfig())
    with pytest.raises(InvalidSetting, match="quant=w8a8"):
        METHODS.get("quanto").check_bits(W4A4, QuantoConfig())
    with pytest.raises(InvalidSetting, match="preset"):
        ModelOptConfig(preset="INT3_CFG")
    w4a8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
    with pytest.raises(InvalidSetting):  # SmoothQuant's preset is an INT8 one
        METHODS.get("modelopt").check_bits(w4a8, ModelOptConfig(preset="INT8_SMOOTHQUANT_CFG"))
    if importlib.util.find_spec("optimum") is not None:
        with pytest.raises(ConfigError, match="method=quanto"):
            typed_run_config(make_cfg(["method=quanto", "quant=w4a4"]))


def test_a_missing_library_names_the_install(monkeypatch):
    monkeypatch.setattr(toolkits.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidSetting, match=r"pip install -e '\.\[toolkits\]'"):
        METHODS.get("quanto").check(W8A8, QuantoConfig())
    with pytest.raises(InvalidSetting, match="nvidia-modelopt"):
        METHODS.get("modelopt").check(W8A8, ModelOptConfig())


def test_a_quanto_model_has_a_sampling_digest():
    """The app keys saved sample batches by the denoiser's numbers: Quanto's LayerNorm without
    affine weights puts None into its state dict (the dit_digits jobs failed on it)."""
    oq = pytest.importorskip("optimum.quanto")
    from diffquant.cache import module_digest

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, elementwise_affine=False))
    oq.quantize(net, weights=oq.qint8, activations=oq.qint8)
    with oq.Calibration():
        net(torch.randn(4, 8))
    oq.freeze(net)
    assert any(v is None for v in net.state_dict().values())
    assert module_digest(net) == module_digest(net)
