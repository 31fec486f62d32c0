"""The papers' other columns: sFID (spatial features), and per sample against the FP model's image
with the same seed PSNR, SSIM and the embedded LPIPS stand-in ``lpips_digits``; against known
values, through the FP reference's image cache, and end to end through the app (one sampling pass,
the same metrics whatever the batch size or shards)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from diffquant.eval.backbones.digits import DigitsBackbone
from diffquant.eval.backbones.digits_cnn import DigitsClassifier
from diffquant.eval.backbones.inception import OutputTap
from diffquant.eval.fp_images import FPImages, ImageBlockWriter, to_uint8
from diffquant.eval.lpips import DigitsFeatureDistance, check_lpips, feature_map_distance
from diffquant.eval.metrics import EvalBatch, FrechetDistance
from diffquant.eval.paired import PSNR_MAX_DB, PairedMetric, psnr_values, ssim_values
from diffquant.models.loading import ZOO_DIR, MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_KEYS = ("sfid", "psnr", "ssim", "lpips_digits")


def levels(shape, seed=0, high=240):
    """Random 8-bit images ``k / 255`` (exact under :func:`to_uint8`)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).float() / 255


@pytest.fixture(scope="module")
def digits_backbone():
    return DigitsBackbone(DigitsClassifier.from_pretrained(ZOO_DIR / "digits_classifier"))


@pytest.fixture(scope="module")
def heldout():
    from diffquant.data.digits import load_digits

    return load_digits("heldout")[0]


# ---------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_of_identical_images_is_the_cap_and_of_known_noise_the_closed_form():
    x = levels((4, 1, 32, 32))
    assert torch.equal(psnr_values(x, x), torch.full((4,), PSNR_MAX_DB))
    offset = torch.zeros_like(x)
    offset[:, :, ::2] = 3 / 255  # every other row three levels up: MSE = (3/255)² / 2
    for k, scale in enumerate((1, 2, 5, 10)):
        y = x.clone()
        y[k] += scale * offset[k]
        mse = (scale * 3 / 255) ** 2 / 2
        assert psnr_values(x, y)[k].item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)


def test_ssim_of_identical_images_is_one_and_of_constant_images_the_closed_form():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    x = levels((3, 1, 32, 32), seed=1)
    assert ssim_values(x, x) == pytest.approx(torch.ones(3), abs=1e-6)
    a, b = torch.full((1, 1, 32, 32), 0.4), torch.full((1, 1, 32, 32), 0.6)
    c1 = 0.01**2  # constant windows: SSIM = (2ab + C1) / (a² + b² + C1)
    closed_form = (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1)
    exact = [torch.full((1, 1, 32, 32), v, dtype=torch.float64) for v in (0.4, 0.6)]
    assert ssim_values(*exact).item() == pytest.approx(closed_form, abs=1e-9)
    assert ssim_values(a, b).item() == pytest.approx(closed_form, abs=5e-4)  # float32: see ssim_values
    y = levels((3, 1, 32, 32), seed=2)
    metric = StructuralSimilarityIndexMeasure(data_range=1.0)
    metric.update(x, y)
    assert ssim_values(x, y).mean().item() == pytest.approx(metric.compute().item(), abs=1e-6)


# ---------------------------------------------------------------------------- FP image blocks
def test_fp_image_blocks_tile_the_samples_and_serve_any_chunk(tmp_path):
    images = levels((10, 1, 8, 8), seed=3)
    writer = ImageBlockWriter(tmp_path / "staged")
    for idx in (range(2, 5), range(5, 9), range(9, 12)):
        writer.write(idx, images[idx.start - 2 : idx.stop - 2])
    assert FPImages.open(tmp_path / "staged", range(2, 13)) is None  # sample 12 missing
    with pytest.raises(RuntimeError, match="do not cover"):
        writer.move_into(tmp_path, range(0, 12))
    entry = tmp_path / "entry"
    entry.mkdir()
    writer.move_into(entry, range(2, 12))
    assert not (tmp_path / "staged").exists()
    fp = FPImages.open(entry, range(2, 12))
    got, present = fp.get(range(0, 6))  # a chunk that starts before this shard's samples
    assert present.tolist() == [False, False, True, True, True, True]
    assert torch.equal(got[2:], to_uint8(images[:4])) and not got[:2].any()
    got, present = fp.get(range(4, 12))  # across three blocks
    assert present.all() and torch.equal(got, to_uint8(images[2:]))


def paired(name, compare, fp_images, x, indices):
    metric = PairedMetric(name, lambda: fp_images, compare)
    values = metric.per_sample(x, [], indices)
    metric.update(EvalBatch(None, [], torch.zeros(len(x), 1), None, {name: values}))
    return values, metric


def test_paired_metric_pairs_sample_i_with_fp_sample_i(tmp_path):
    fp = levels((6, 1, 16, 16), seed=4)
    writer = ImageBlockWriter(tmp_path / "fp")
    writer.write(range(0, 6), fp)
    source = FPImages.open(tmp_path / "fp", range(0, 6))
    x = fp.clone()
    x[3] = (x[3] + 2 / 255).clamp(0, 1)
    values, metric = paired("psnr", psnr_values, source, x, range(0, 6))
    assert values[[0, 1, 2, 4, 5]].eq(PSNR_MAX_DB).all() and values[3] < 60
    assert metric.compute()["psnr"] == pytest.approx(values.mean().item())
    chunk = torch.cat([x[4:], levels((2, 1, 16, 16), seed=5)])  # samples 4..7; 6, 7 have no FP image
    values, metric = paired("psnr", psnr_values, source, chunk, range(4, 8))
    assert values[:2].isfinite().all() and values[2:].isnan().all()
    with pytest.raises(FloatingPointError, match="2 of 4 samples"):
        metric.compute()


# ---------------------------------------------------------------------------- sFID
def test_digits_spatial_features_are_one_8x8_channel_and_leave_the_fid_features_unchanged(
    digits_backbone, heldout
):
    clf = digits_backbone.classifier
    x = heldout[:16]
    out = digits_backbone(x)
    with torch.no_grad():
        before = clf.embed(clf.trunk(clf.preprocess(x)))  # the trunk as one nn.Sequential call
        stage3 = clf.trunk[:7](clf.preprocess(x))
    assert torch.equal(out["features"], before)  # FID numbers stay the bits they were
    assert out["spatial"].shape == (16, 64)
    assert torch.equal(out["spatial"], stage3[:, 0].flatten(1))


def test_sfid_is_zero_for_a_set_with_itself_and_positive_for_other_sets(digits_backbone, heldout):
    g = torch.Generator().manual_seed(0)
    noisy = (heldout + 0.3 * torch.randn(heldout.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        spatial = digits_backbone(heldout)["spatial"]
        spatial_noisy = digits_backbone(noisy)["spatial"]

    def sfid(reference, samples):
        metric = FrechetDistance("sfid", reference, field="spatial")
        for part in samples.split(100):
            metric.update(EvalBatch(None, [], torch.zeros(len(part), 1), None, spatial=part))
        return metric.compute()["sfid"]

    assert abs(sfid(spatial, spatial)) < 1e-6
    halves = sfid(spatial[::2], spatial[1::2])  # two samples of one distribution
    assert halves > 0.1
    assert sfid(spatial, spatial_noisy) > 3 * halves  # noisy digits: another distribution
    with pytest.raises(ValueError, match="no spatial features"):
        FrechetDistance("sfid", spatial, field="spatial").update(EvalBatch(None, [], spatial, None))


def test_output_tap_reads_the_first_channels_in_hwc_order():
    """The hook FidelityInception puts on ``Mixed_6d.branch1x1`` (ADM's mixed_6/conv), on a
    stand-in network with that module path: 7 of 192 channels at 17×17 = 2023 values."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.branch1x1 = torch.nn.Conv2d(3, 192, 1)

        def forward(self, x):
            return self.branch1x1(x).relu().mean(dim=1)

    net = torch.nn.Sequential()
    net.add_module("Mixed_6d", Block())
    tap = OutputTap(net, "Mixed_6d.branch1x1", 7)
    x = torch.randn(2, 3, 17, 17)
    net(x)
    spatial = tap.take()
    conv = net.Mixed_6d.branch1x1
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias)[:, :7]
    assert spatial.shape == (2, 2023)
    assert torch.equal(spatial.reshape(2, 17, 17, 7), expected.permute(0, 2, 3, 1))
    with pytest.raises(RuntimeError, match="has not run"):
        tap.take()


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None, reason="cluster only: needs torch-fidelity"
)
def test_fidelity_inception_spatial_features_with_random_weights(tmp_path):  # pragma: no cover
    """torch-fidelity's InceptionV3 with random weights (same architecture): the tapped module
    exists, sits at 17×17 and gives ADM's 2023 dimensions."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffquant.eval.backbones.inception import FidelityInception

    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch("torch.load", return_value={}),
    ):
        random_net = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path="-")
    torch.save(random_net.state_dict(), tmp_path / "random.pth")
    backbone = FidelityInception(str(tmp_path / "random.pth"))
    seen = []
    backbone.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    out = backbone(torch.rand(2, 3, 64, 64))
    assert out["features"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    assert seen[0].shape == (2, 192, 17, 17)
    assert torch.equal(out["spatial"], seen[0][:, :7].permute(0, 2, 3, 1).flatten(1))


# ---------------------------------------------------------------------------- LPIPS
def test_lpips_digits_is_zero_for_identical_images_and_grows_with_noise(digits_backbone, heldout):
    x = heldout[:64]
    distance = DigitsFeatureDistance(digits_backbone)
    with torch.no_grad():
        assert distance(x, x).abs().max() == 0
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape, generator=g)
        means = [distance(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 0 < means[0] < means[1] < means[2] <= 6


def test_feature_map_distance_of_unit_vectors():
    """Two layers of one position each: orthogonal unit vectors (squared distance 2) and the same
    direction at another length (0: LPIPS compares directions)."""
    a = [torch.tensor([[1.0, 0.0]]).reshape(1, 2, 1, 1), torch.tensor([[3.0, 4.0]]).reshape(1, 2, 1, 1)]
    b = [torch.tensor([[0.0, 2.0]]).reshape(1, 2, 1, 1), torch.tensor([[0.6, 0.8]]).reshape(1, 2, 1, 1)]
    assert feature_map_distance(a, b).item() == pytest.approx(2.0, abs=1e-6)


def test_lpips_preflight_names_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else real(n, *a)
    )
    with pytest.raises(MissingWeightsError, match=r"torchvision.*\[cluster\].*lpips_digits"):
        check_lpips(None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        check_lpips(None)


def test_metrics_needing_a_backbone_part_fail_before_any_work(make_cfg, monkeypatch):
    from diffquant.context import RunContext
    from diffquant.eval.evaluation import Evaluation

    cfg = make_cfg(["logger=none"])
    ctx = RunContext(
        run_dir=Path(cfg.paths.output_dir), cache_dir=Path(cfg.paths.cache_dir), device="cpu", seed=0
    )
    monkeypatch.setattr(DigitsBackbone, "spatial_layer", None)
    with pytest.raises(ValueError, match="metric sfid needs spatial of the backbone"):
        Evaluation(cfg.evaluator, ctx)


# ---------------------------------------------------------------------------- through the app
SMALL = ["logger=none", "evaluator.n_samples=40", "evaluator.batch_size=20"]
W4A8 = ["quant=w4a8", "method=ptq_minmax", "method.calib.n_samples=4", "method.calib.step_stride=5"]


def test_embedded_default_records_the_new_metrics_from_one_sampling_pass(make_cfg, monkeypatch):
    """The FP job reports the identity values and leaves its 8-bit images in the FP reference; the
    quantized job then samples only its own chunks (no FP reference pass) and reports finite sFID,
    PSNR, SSIM and lpips_digits in metrics.json."""
    import diffquant.app as app

    passes = []
    generate = app.generate
    monkeypatch.setattr(app, "generate", lambda *a, **k: passes.append(k.get("desc")) or generate(*a, **k))

    fp = app.run(make_cfg(SMALL, name="fp"))
    assert (fp["fid_to_fp"], fp["psnr"], fp["ssim"], fp["lpips_digits"]) == (0.0, PSNR_MAX_DB, 1.0, 0.0)
    assert math.isfinite(fp["sfid"]) and fp["sfid"] > 0
    assert not (Path(make_cfg([], name="fp").paths.output_dir) / "fp_images").exists()  # in the cache

    cfg = make_cfg([*SMALL, *W4A8], name="w4a8")
    q = app.run(cfg)
    assert passes == [None, None]  # the FP job's and this job's sampling; no "FP reference" pass
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for key in NEW_KEYS:
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
    assert 10 < q["psnr"] < PSNR_MAX_DB and 0 < q["ssim"] < 1 and q["lpips_digits"] > 0 and q["sfid"] > 0


def test_new_metrics_do_not_depend_on_batch_size_or_shards(make_cfg, tmp_path):
    """A W4A8 job at batch sizes 8 and 3 and as two merged shards (whose boundary cuts a chunk of
    3) reports the same sFID, PSNR, SSIM and lpips_digits, bit for bit."""
    from diffquant.app import run
    from diffquant.shards import merge_sweep

    small = ["logger=none", "evaluator.n_samples=8", "evaluator.chunk_size=3", *W4A8]
    whole = run(make_cfg([*small, "evaluator.batch_size=8"], name="b8"))
    other = run(make_cfg([*small, "evaluator.batch_size=3"], name="b3"))
    for k in range(2):
        shard = ["evaluator.batch_size=3", "evaluator.num_shards=2", f"evaluator.shard_index={k}"]
        run(make_cfg([*small, *shard], name=f"sweep/shard{k}"))
    [merged_dir] = merge_sweep(tmp_path / "sweep")
    merged = json.loads((merged_dir / "metrics.json").read_text())
    for key in (*NEW_KEYS, "fid", "fid_to_fp"):
        assert whole[key] == other[key] == merged[key], key
    assert 0 < whole["ssim"] < 1


def test_fp_reference_without_images_is_sampled_again_with_them(make_cfg, monkeypatch):
    """An FP job of an evaluator without per-sample metrics caches features only; a quantized job
    that needs the images samples the FP reference again (the same features) and keeps them."""
    import diffquant.app as app

    passes = []
    generate = app.generate
    monkeypatch.setattr(app, "generate", lambda *a, **k: passes.append(k.get("desc")) or generate(*a, **k))
    tiny = ["logger=none", "evaluator.n_samples=8", "evaluator.batch_size=4"]
    app.run(make_cfg([*tiny, "evaluator.metrics=[fid,fid_to_fp]"], name="fp"))
    q = app.run(make_cfg([*tiny, *W4A8, "evaluator.metrics=[fid_to_fp,psnr]"], name="q"))
    again = app.run(make_cfg([*tiny, *W4A8, "evaluator.metrics=[fid_to_fp,ssim]"], name="q2"))
    assert passes == [None, "FP reference", None, None]  # the third job finds the images cached
    assert math.isfinite(q["psnr"]) and q["fid_to_fp"] == again["fid_to_fp"] and 0 < again["ssim"] < 1
