"""The embedded digits data, the shipped digits classifier and ``ldm_digits``, and the training command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffquant.data import digits as digits_module
from diffquant.data import load_digits
from diffquant.eval.backbones.digits_cnn import DigitsClassifier
from diffquant.zoo import train as zoo_train

WEIGHTS = Path(zoo_train.__file__).resolve().parent / "weights"
LDM = WEIGHTS / "ldm_digits"
CLASSIFIER = WEIGHTS / "digits_classifier"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_split_sizes_shapes_and_ranges():
    train_x, train_y = load_digits("train")
    held_x, held_y = load_digits("heldout")
    all_x, all_y = load_digits("all")
    assert train_x.shape == (1437, 1, 32, 32) and held_x.shape == (360, 1, 32, 32)
    assert all_x.shape == (1797, 1, 32, 32)
    for x, y in [(train_x, train_y), (held_x, held_y), (all_x, all_y)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.99
        assert y.shape == (len(x),) and set(y.tolist()) == set(range(10))
    small, _ = load_digits("heldout", size=16)
    assert small.shape == (360, 1, 16, 16)
    native, _ = load_digits("all", size=8)
    from sklearn.datasets import load_digits as sk_load

    assert torch.allclose(native[:, 0], torch.from_numpy(sk_load().images).float() / 16)


def test_split_is_deterministic_stratified_and_disjoint():
    x1, y1 = load_digits("heldout")
    x2, y2 = load_digits("heldout")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    train_x, train_y = load_digits("train", size=8)
    held_x, held_y = load_digits("heldout", size=8)
    all_x, all_y = load_digits("all", size=8)
    # disjoint and covering: the splits are complementary index sets of scikit-learn's order
    train_idx, held_idx = digits_module._split_indices(all_y.numpy())
    assert len(set(train_idx.tolist()) & set(held_idx.tolist())) == 0
    assert sorted([*train_idx.tolist(), *held_idx.tolist()]) == list(range(len(all_y)))
    assert torch.equal(train_x, all_x[train_idx]) and torch.equal(train_y, all_y[train_idx])
    assert torch.equal(held_x, all_x[held_idx]) and torch.equal(held_y, all_y[held_idx])
    # stratified: each class is 20% ± 1 image of its total
    for c in range(10):
        n_all, n_held = int((all_y == c).sum()), int((held_y == c).sum())
        assert abs(n_held - 0.2 * n_all) <= 1
    with pytest.raises(ValueError):
        load_digits("test")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# shipped classifier
# --------------------------------------------------------------------------------------------


def test_shipped_classifier_accuracy():
    model = DigitsClassifier.from_pretrained(CLASSIFIER)
    assert not model.training and model.num_features == 64
    images, labels = load_digits("heldout")
    out = model(images[:7])
    assert out["features"].shape == (7, 64) and out["logits"].shape == (7, 10)
    acc = (model.predict(images) == labels).float().mean().item()
    assert acc >= 0.97, acc


def test_classifier_accepts_rgb_and_other_sizes():
    model = DigitsClassifier.from_pretrained(CLASSIFIER)
    images, _ = load_digits("heldout", size=32)
    with torch.no_grad():
        gray = model(images[:16])["logits"]
        rgb = model(images[:16].expand(-1, 3, -1, -1))["logits"]
        big = model(torch.nn.functional.interpolate(images[:16], size=64, mode="bilinear"))["logits"]
    assert torch.allclose(gray, rgb, atol=1e-5)
    assert big.shape == (16, 10) and (big.argmax(1) == gray.argmax(1)).float().mean() >= 0.9


# --------------------------------------------------------------------------------------------
# shipped ldm_digits
# --------------------------------------------------------------------------------------------


def test_ldm_digits_loads_and_runs():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    meta = json.loads((LDM / "diffquant.json").read_text())
    assert meta["family"] == "ldm" and meta["null_class"] == 10 and meta["latent_shape"] == [4, 8, 8]
    unet = UNet2DModel.from_pretrained(LDM, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(LDM, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(LDM, subfolder="scheduler")
    assert sum(p.numel() for p in unet.parameters()) <= 2_500_000
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 8
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False
    assert vae.config.scaling_factor != 1.0
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    labels = torch.tensor([0, 3, 9, 10, 10, 5])
    with torch.no_grad():
        eps = unet(latents, torch.tensor([999, 500, 1, 999, 20, 250]), class_labels=labels).sample
        images = vae.decode(latents / vae.config.scaling_factor).sample
    assert eps.shape == (6, 4, 8, 8) and torch.isfinite(eps).all()
    assert images.shape == (6, 1, 32, 32) and torch.isfinite(images).all()


def test_shipped_weights_stay_small():
    # ldm_digits and digits_classifier together (other zoo models have their own budgets)
    total = sum(p.stat().st_size for folder in (LDM, CLASSIFIER) for p in folder.rglob("*") if p.is_file())
    assert total <= 12 * 10**6, total


# --------------------------------------------------------------------------------------------
# training command
# --------------------------------------------------------------------------------------------


def test_train_smoke_run_writes_loadable_classifier(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    results = zoo_train.main(["digits_classifier", "--steps-scale", "0.01", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # settings are restored after the run
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    folder = tmp_path / "digits_classifier"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    model = DigitsClassifier.from_pretrained(folder)
    assert model.config["meta"]["steps"] == results["digits_classifier"]["steps"]
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32))
    assert out["features"].shape == (2, 64) and torch.isfinite(out["logits"]).all()


def test_train_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        zoo_train.parse_args(["nope"])
    with pytest.raises(SystemExit):
        zoo_train.parse_args(["all", "--steps-scale", "0"])
