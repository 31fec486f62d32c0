"""The ``clip_score`` metric: torchmetrics' CLIPScore with an offline loader; the embedded digits CLIP
ranks matching captions above shuffled ones; absent CLIP weights fail before any sampling."""

from __future__ import annotations

import pytest
import torch

from diffquant.eval.clip_score import ClipScoreMetric, clip_loader, to_clip_images
from diffquant.eval.metrics import EvalBatch
from diffquant.models.loading import ZOO_DIR, MissingWeightsError
from diffquant.zoo.captions import caption
from tiny_components import write_clip_folder

DIGITS_CLIP = ZOO_DIR / "digits_clip"

pytestmark = pytest.mark.usefixtures("one_thread")


def score(metric: ClipScoreMetric, images: torch.Tensor, prompts: list[str], batch: int = 128) -> float:
    """The metric's value over ``images`` / ``prompts``, fed as the evaluation feeds it."""
    for i in range(0, len(prompts), batch):
        imgs, texts = images[i : i + batch], prompts[i : i + batch]
        per_sample = {metric.name: metric.per_sample(imgs, texts)}
        metric.update(EvalBatch(None, texts, torch.zeros(len(texts), 1), None, per_sample))
    return metric.compute()["clip_score"]


def test_metric_equals_torchmetrics_clipscore_on_a_tiny_local_clip(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore

    folder = write_clip_folder(tmp_path / "clip")
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = [caption(i % 10, i % 3) for i in range(6)]
    ours = score(ClipScoreMetric(clip_loader(str(folder))), images, prompts, batch=4)
    reference = CLIPScore(model_name_or_path=clip_loader(str(folder)))
    reference.update(to_clip_images(images), prompts)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)
    assert 0 <= ours <= 100


@pytest.mark.skipif(
    not (DIGITS_CLIP / "config.json").is_file(),
    reason="digits_clip not trained (python -m diffquant.zoo.train_sd digits_clip)",
)
def test_embedded_clip_ranks_matching_captions_above_shuffled():
    from diffquant.data.digits import load_digits

    images, labels = load_digits("heldout", 32)
    matching = [caption(int(y), 0) for y in labels]
    shuffled = [
        matching[i] for i in torch.randperm(len(matching), generator=torch.Generator().manual_seed(0))
    ]
    loader = clip_loader("zoo:digits_clip")
    s_match = score(ClipScoreMetric(loader), images, matching)
    s_shuffled = score(ClipScoreMetric(loader), images, shuffled)
    print(f"digits_clip on held-out digits: matching {s_match:.2f}, shuffled {s_shuffled:.2f}")
    assert s_match > s_shuffled + 10


def test_absent_clip_model_fails_before_any_sampling(make_cfg, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from diffquant.context import RunContext
    from diffquant.eval.backbones.digits_cnn import DigitsClassifier
    from diffquant.eval.evaluation import Evaluation

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    DigitsClassifier().save_pretrained(tmp_path / "cls")
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    for spec, needle in [
        (tmp_path / "absent", "evaluator.clip_model="),
        ("openai/clip-vit-base-patch16", "huggingface-cli download openai/clip-vit-base-patch16"),
        ("zoo:not_trained", "python -m diffquant.zoo.train_sd digits_clip"),
    ]:
        cfg = make_cfg(
            [
                "evaluator=clip_digits",
                f"evaluator.clip_model={spec}",
                f"evaluator.backbone_weights={tmp_path / 'cls'}",
            ]
        )
        with pytest.raises(MissingWeightsError, match=needle):
            Evaluation(cfg.evaluator, ctx)


def test_clip_score_without_a_model_names_the_key(make_cfg, tmp_path):
    from diffquant.eval.clip_score import check_clip_model

    cfg = make_cfg(["evaluator=digits", "evaluator.metrics=[clip_score]"])
    with pytest.raises(ValueError, match="evaluator.clip_model"):
        check_clip_model(cfg.evaluator)
