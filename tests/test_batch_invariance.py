"""Sample i is the same bits whatever the batch size or shard that draws it, and a run folder
only ever replays the progress of the configuration that made it.

Kernels pick their blocking by row count (oneDNN convolutions and GEMMs differ at ~1e-6 between a
call of 1, 7 or 250 rows), so :func:`diffquant.eval.sampling.generate` runs every model call on a
fixed chunk of sample indices (``evaluator.chunk_size``); these tests compare per-sample features,
logits, labels and images bit for bit (``torch.equal``), for the FP model and a W4A8 one, whose
quantizers would turn any low-bit difference into a different rounding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from diffquant.app import quantize, run
from diffquant.context import RunContext
from diffquant.eval.evaluation import Evaluation
from diffquant.eval.sampling import SampleGrid, generate
from diffquant.models.loading import build_model
from diffquant.schema import typed_run_config
from diffquant.shards import shard_indices

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
W4A8 = [
    "quant=w4a8",
    "method=ptq_minmax",
    "method.calib.n_samples=4",
    "method.calib.step_stride=5",
    "method.act_init_rows=32",
]


def evaluation_of(cfg):
    ctx = RunContext(
        run_dir=Path(cfg.paths.output_dir),
        cache_dir=Path(cfg.paths.cache_dir),
        device=torch.device("cpu"),
        seed=0,
    )
    return Evaluation(cfg.evaluator, ctx), ctx


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """The FP ldm_digits and a W4A8 ptq_minmax copy of it (built once for the module)."""
    out = {}
    for name, overrides in (("fp", []), ("w4a8", W4A8)):
        cfg = compose_config(["logger=none", *overrides], tmp_path_factory.mktemp(name))
        ctx = evaluation_of(cfg)[1]
        run_cfg = typed_run_config(cfg)
        out[name] = quantize(build_model(run_cfg.model, "cpu"), run_cfg.quant, run_cfg.method, ctx).model
    return out


def make_evaluation(make_cfg, n=N, chunk_size=None):
    chunk = [] if chunk_size is None else [f"evaluator.chunk_size={chunk_size}"]
    return evaluation_of(make_cfg(["logger=none", f"evaluator.n_samples={n}", *chunk]))[0]


def draw(model, evaluation, batch_size, indices=None, progress_dir=None, progress_key=None):
    """Per-sample features, logits, labels and images of ``indices`` (default: all samples)."""
    indices = range(evaluation.cfg.n_samples) if indices is None else indices
    out = {"features": [], "logits": [], "labels": [], "images": []}
    for batch, _ in generate(
        model,
        evaluation,
        len(indices),
        0,
        batch_size,
        progress_dir,
        keep_images=len(indices),
        start=indices.start,
        progress_key=progress_key,
    ):
        out["features"].append(batch.features)
        out["logits"].append(batch.logits)
        out["labels"].extend(batch.labels)
        out["images"].append(batch.images)
    return {k: v if k == "labels" else torch.cat(v) for k, v in out.items()}


def merge(shards):
    return {
        k: [x for s in shards for x in s[k]] if k == "labels" else torch.cat([s[k] for s in shards])
        for k in shards[0]
    }


def assert_identical(a, b, what):
    assert a["labels"] == b["labels"], what
    for key in ("features", "logits", "images"):
        diff = (a[key] - b[key]).abs().max().item()
        assert torch.equal(a[key], b[key]), f"{what}: {key} differ (max |diff| {diff:.3e})"


@pytest.mark.parametrize("chunk_size", [3, 32])  # 3: several chunks, shard edges inside a chunk
@pytest.mark.parametrize("method", ["fp", "w4a8"])
def test_samples_do_not_depend_on_batch_size_or_shard(make_cfg, models, method, chunk_size, monkeypatch):
    model, ev = models[method], make_evaluation(make_cfg, chunk_size=chunk_size)
    calls = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda idx, seed: calls.append(list(idx)) or sample(idx, seed))

    reference = draw(model, ev, N)
    for batch_size in (1, 7):
        assert_identical(draw(model, ev, batch_size), reference, f"batch_size={batch_size}")
    shards = [draw(model, ev, 7, shard_indices(N, 2, k)) for k in range(2)]
    assert_identical(merge(shards), reference, "2 shards")

    chunks = [list(c) for c in SampleGrid(N, chunk_size).chunks(0, N)]
    assert all(call in chunks for call in calls), calls  # the model only ever sees whole chunks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fp", "w4a8"])
def test_250_samples_at_batch_sizes_1_7_250_and_2_shards(make_cfg, models, method):
    """The issue's acceptance check at the embedded evaluator's size (default chunk_size)."""
    model, ev = models[method], make_evaluation(make_cfg, n=250)
    reference = draw(model, ev, 250)
    for batch_size in (1, 7):
        assert_identical(draw(model, ev, batch_size), reference, f"batch_size={batch_size}")
    shards = [draw(model, ev, 250, shard_indices(250, 2, k)) for k in range(2)]
    assert_identical(merge(shards), reference, "2 shards")


def test_sharded_runs_merge_to_the_unsharded_metrics_exactly(make_cfg, tmp_path):
    """End to end: an unsharded job with batch 3 and two shard jobs (batch 3) merged give bit for
    bit the FID and IS of the unsharded job with batch 8."""
    from diffquant.shards import merge_sweep

    small = ["logger=none", f"evaluator.n_samples={N}", "evaluator.chunk_size=3"]
    whole = run(make_cfg([*small, "evaluator.batch_size=8"], name="whole"))
    other_batches = run(make_cfg([*small, "evaluator.batch_size=3"], name="whole_b3"))
    assert (other_batches["fid"], other_batches["inception_score"]) == (
        whole["fid"],
        whole["inception_score"],
    )
    for k in range(2):
        run(
            make_cfg(
                [*small, "evaluator.batch_size=3", "evaluator.num_shards=2", f"evaluator.shard_index={k}"],
                name=f"sweep/shard{k}",
            )
        )
    [merged_dir] = merge_sweep(tmp_path / "sweep")
    merged = json.loads((merged_dir / "metrics.json").read_text())
    assert (merged["fid"], merged["inception_score"]) == (whole["fid"], whole["inception_score"])


def test_fid_does_not_depend_on_how_the_features_arrive():
    """torchmetrics sums each update separately: FrechetDistance sums in fixed groups instead."""
    from diffquant.eval.metrics import EvalBatch, FrechetDistance

    g = torch.Generator().manual_seed(0)
    reference, features = torch.randn(300, 16, generator=g), torch.randn(500, 16, generator=g) + 0.1

    def fid(batch_size):
        metric = FrechetDistance("fid", reference)
        for part in features.split(batch_size):
            metric.update(EvalBatch(None, [], part, None))
        return metric.compute()["fid"]

    assert fid(500) == fid(250) == fid(7) == fid(1)


def test_progress_is_only_replayed_by_the_configuration_that_made_it(make_cfg, caplog):
    """W8A8 then W4A4 in the same run folder: the second job samples afresh (and says so) and
    reports what a W4A4 job in a fresh folder reports, not the W8A8 numbers."""
    small = [
        "logger=none",
        "evaluator.n_samples=8",
        "evaluator.batch_size=4",
        "method=ptq_minmax",
        "method.calib.n_samples=4",
        "method.calib.step_stride=5",
        "method.act_init_rows=32",
    ]
    w8a8 = run(make_cfg([*small, "quant=w8a8"], name="reused"))
    with caplog.at_level(logging.WARNING, logger="diffquant"):
        w4a4 = run(make_cfg([*small, "quant=w4a4"], name="reused"))
    fresh = run(make_cfg([*small, "quant=w4a4"], name="fresh"))
    assert w4a4["act_bits"] == 4 and w4a4["config_hash"] != w8a8["config_hash"]
    for key in ("fid", "inception_score", "fid_to_fp"):
        assert w4a4[key] == fresh[key], key
    assert w4a4["fid_to_fp"] != w8a8["fid_to_fp"]
    progress = Path(make_cfg([], name="reused").paths.output_dir) / "progress"
    warned = [r.getMessage() for r in caplog.records if "another configuration" in r.getMessage()]
    assert len(warned) == 1 and str(progress) in warned[0] and "batch_0000000_4_" in warned[0], warned
    assert len(list(progress.glob("batch_*.pt"))) == 4  # both jobs' batches, each under its own tag


def test_damaged_or_foreign_batch_files_are_sampled_again(make_cfg, models, tmp_path, caplog, monkeypatch):
    model, ev = models["fp"], make_evaluation(make_cfg, chunk_size=3)
    fresh = draw(model, ev, 4, progress_dir=tmp_path / "p", progress_key="a")
    files = sorted((tmp_path / "p").glob("batch_*.pt"))
    assert len(files) == 2
    files[0].write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="diffquant"):
        again = draw(model, ev, 4, progress_dir=tmp_path / "p", progress_key="a")
    assert_identical(again, fresh, "resumed")
    assert any("unreadable" in r.getMessage() and files[0].name in r.getMessage() for r in caplog.records)

    calls = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda idx, seed: calls.append(list(idx)) or sample(idx, seed))
    draw(model, ev, 4, progress_dir=tmp_path / "p", progress_key="a")
    assert calls == []  # everything replayed
    draw(model, ev, 4, progress_dir=tmp_path / "p", progress_key="b")
    assert calls  # another key replays nothing


def test_grid_covers_a_slice_with_whole_chunks_and_rejects_bad_settings():
    grid = SampleGrid(10, 4)
    assert grid.chunks(0, 10) == [range(0, 4), range(4, 8), range(8, 10)]
    assert grid.chunks(5, 9) == [range(4, 8), range(8, 10)]  # a shard inside chunks: whole chunks
    with pytest.raises(ValueError, match="evaluator.n_samples"):
        grid.chunks(8, 11)
    with pytest.raises(ValueError, match=r"evaluator.chunk_size=0 must be positive"):
        SampleGrid(10, 0)
