"""The paper-table command on synthetic sweeps, and the published numbers it joins."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONF, ROOT
from diffquant.tables import build_table, load_published, main, render_markdown

PUBLISHED = ROOT / "experiments" / "published.yaml"


def write_job(sweep: Path, name: str, **metrics) -> None:
    base = {
        "model": "ldm_imagenet",
        "method": "fp",
        "weight_bits": 32,
        "act_bits": 32,
        "seed": 0,
        "n_samples": 100,
        "fid": None,
        "inception_score": None,
        "fid_to_fp": None,
        "experiment": "quest_imagenet",
        "config_hash": name,
        "num_shards": 1,
        "shard_index": None,
    }
    (sweep / name).mkdir(parents=True)
    (sweep / name / "metrics.json").write_text(json.dumps({**base, **metrics}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "sweep"
    write_job(s, "0_fp_s0", fid=11.0, inception_score=360.0, fid_to_fp=0.0)
    write_job(s, "1_fp_s1", seed=1, fid=11.5, inception_score=370.0, fid_to_fp=0.0)
    write_job(
        s, "2_ptq", method="ptq", weight_bits=4, act_bits=8, fid=9.0, inception_score=340.0, fid_to_fp=1.5
    )
    write_job(
        s, "3_quest", method="quest", weight_bits=4, act_bits=8, fid=8.5, inception_score=350.0, fid_to_fp=0.9
    )
    write_job(
        s,
        "4_ptq_w4a4",
        method="ptq",
        weight_bits=4,
        act_bits=4,
        fid=150.0,
        inception_score=20.0,
        fid_to_fp=120.0,
    )
    write_job(s, "5_ptq_w3a6", method="ptq", weight_bits=3, act_bits=6, fid=40.0)  # not in the paper
    # one slice of a sharded evaluation: no FID of its own, so never a row
    write_job(s, "6_shard", method="quest", weight_bits=8, act_bits=8, num_shards=2, shard_index=0)
    return s


def test_table_joins_ours_and_the_papers(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.startswith((out / "table.md").read_text())
    assert "QuEST (Wang et al., ICCV 2025; arXiv 2402.03666v6) — Table 4" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ldm_imagenet")]
    # paper order (FP, W8A8 rows of methods we ran, W4A8, W4A4), then our extra W3A6 row
    assert [ln.split(" | ")[1:4] for ln in lines] == [
        ["fp", "FP", "W32A32"],
        ["ptq", "Q-Diffusion", "W8A8"],
        ["quest", "QuEST", "W8A8"],
        ["ptq", "Q-Diffusion", "W4A8"],
        ["quest", "QuEST", "W4A8"],
        ["ptq", "Q-Diffusion", "W4A4"],
        ["quest", "QuEST", "W4A4"],
        ["ptq", "", "W3A6"],
    ]
    fp = lines[0]
    assert "| 2 | 100 | 11.25 ± 0.35 | 11.28 | -0.03 |" in fp  # mean ± std over two seeds, Δ
    assert "| 8.50 | 8.48 | +0.02 |" in lines[4]  # one seed: no ±
    assert "| 150.00 | N/A | — |" in lines[5]  # the paper's generation failure
    assert "— | 10.60 | —" in lines[1]  # a published row we did not run
    assert "PTQ-D" not in md and "EfficientDM" not in md  # other papers' methods: --all-published

    rows = list(csv.DictReader((out / "table.csv").open()))
    fp_row = rows[0]
    assert fp_row["seeds"] == "0 1" and float(fp_row["fid_ours"]) == pytest.approx(11.25)
    assert float(fp_row["fid_ours_std"]) == pytest.approx(0.353553, rel=1e-5)
    assert float(fp_row["fid_paper"]) == 11.28 and float(fp_row["fid_diff"]) == pytest.approx(-0.03)
    assert rows[5]["fid_paper"] == "N/A" and rows[5]["fid_diff"] == ""

    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"ldm\_imagenet" in tex and r"11.25 $\pm$ 0.35" in tex
    assert r"FID $\Delta$" in tex and tex.count(r"\\") == len(rows) + 1


def test_all_published_rows_and_formats(sweep, tmp_path):
    table = build_table(sweep, all_published=True)
    assert len(table.rows) == 14  # 13 published rows + our W3A6 row
    assert (
        main([str(sweep), "--out", str(tmp_path / "o"), "--format", "csv", "--metrics", "fid,fid_to_fp"]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["table.csv"]
    head = (tmp_path / "o" / "table.csv").read_text().splitlines()[0]
    assert head.endswith("fid_to_fp_ours,fid_to_fp_ours_std,fid_to_fp_paper,fid_to_fp_diff")


def test_table_without_published_numbers(tmp_path):
    s = tmp_path / "sweep"
    write_job(
        s, "0", model="ldm_digits", experiment="embedded_digits", fid=35.0, inception_score=8.0, fid_to_fp=0.0
    )
    write_job(
        s,
        "1",
        model="ldm_digits",
        experiment="embedded_digits",
        method="ptq",
        weight_bits=4,
        act_bits=8,
        fid=40.0,
        inception_score=7.5,
        fid_to_fp=5.0,
    )
    md = render_markdown(build_table(s))
    assert "| Model | Method | W/A | seeds | n | FID | IS | FID→FP |" in md
    assert "| ldm_digits | ptq | W4A8 | 1 | 100 | 40.00 | 7.50 | 5.00 |" in md
    assert "paper" not in md.split("\n\n")[1]


def test_bad_arguments_name_the_fix(sweep, tmp_path, capsys):
    assert main([str(sweep), "--experiment", "no_such_table"]) == 1
    assert "no published table" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(sweep), "--format", "pdf"])
    assert "choose from md,tex,csv" in capsys.readouterr().err


def test_mixed_experiments_need_a_choice(sweep, capsys):
    write_job(sweep, "9_other", experiment="quest_sd", fid=1.0)
    assert main([str(sweep)]) == 1
    assert "--experiment" in capsys.readouterr().err
    assert main([str(sweep), "--experiment", "quest_imagenet", "--out", str(sweep / "t")]) == 0


def test_published_numbers_cover_every_experiment_config():
    published = load_published(PUBLISHED)
    names = {yaml.safe_load(p.read_text())["experiment"] for p in (CONF / "experiment").glob("*.yaml")}
    assert names <= set(published), f"experiments without published numbers: {names - set(published)}"
    for name, table in published.items():
        assert table["source"] and table["paper"]
        for row in table["rows"]:
            assert row["bits"].startswith("W") and "A" in row["bits"]
            values = {k: v for k, v in row.items() if k in table["metrics"]}
            assert values, f"{name}: a row without numbers: {row}"
            assert all(isinstance(v, (int, float)) or v == "N/A" for v in values.values()), row


@pytest.mark.parametrize(
    "table, model, method, bits, metric, value",
    [
        ("quest_lsun_bedroom", "ldm_bedroom", "quest", "W4A4", "fid", 5.64),
        ("quest_lsun_church", "ldm_church", "ptq4dm", "W8A8", "fid", 63.93),
        ("quest_imagenet", "ldm_imagenet", "quest", "W8A8", "inception_score", 365.12),
        ("quest_sd", "sd_v1_4", "quest", "W4A4", "clip_score", 28.85),
        ("accuquant_imagenet", "ldm_imagenet", "accuquant", "W3A6", "psnr", 19.0135),
        ("accuquant_sd", "sd_v1_4", "accuquant", "W4A8", "fid_to_fp", 10.99),
        ("qdiffusion_lsun_church", "ldm_church", "ptq", "W4A8", "fid", 7.80),
    ],
)
def test_published_numbers_match_the_notes(table, model, method, bits, metric, value):
    rows = [
        r
        for r in load_published(PUBLISHED)[table]["rows"]
        if (r["model"], r["method"], r["bits"]) == (model, method, bits)
    ]
    assert len(rows) == 1 and rows[0][metric] == value


def test_ablations_are_rows_of_their_own_after_their_method(tmp_path):
    s = tmp_path / "sweep"
    common = dict(model="ldm_digits", experiment="embedded_digits", weight_bits=4, act_bits=4)
    write_job(s, "0", method="quest", method_label="quest", fid=1.0, **common)
    write_job(s, "1", method="quest", method_label="quest[tla_only]", fid=2.0, **common)
    write_job(s, "2", method="ptq", fid=3.0, **common)  # results written before method_label existed
    md = render_markdown(build_table(s, metrics=["fid"]))
    lines = [line for line in md.splitlines() if line.startswith("| ldm_digits")]
    assert [line.split(" | ")[1] for line in lines] == ["ptq", "quest", "quest[tla_only]"]
    assert "| quest[tla_only] | W4A4 | 1 | 100 | 2.00 |" in md


def test_sweep_config_table_callback_writes_the_table(sweep, make_cfg):
    """`sweep=paper`'s callback, as Hydra builds it, on a finished (fake) sweep: table.{md,tex,csv}
    in the sweep folder, with the published numbers (the experiment read from the jobs)."""
    from hydra.utils import instantiate

    cfg = make_cfg(["experiment=quest_imagenet", "sweep=paper", f"hydra.sweep.dir={sweep}"])
    callback = instantiate(cfg.hydra.callbacks.table)
    callback.on_multirun_end(config=cfg)
    md = (sweep / "table.md").read_text()
    assert "QuEST (Wang et al., ICCV 2025; arXiv 2402.03666v6) — Table 4" in md
    assert "| 2 | 100 | 11.25 ± 0.35 | 11.28 | -0.03 |" in md
    assert (sweep / "table.csv").is_file() and (sweep / "table.tex").is_file()


ROW_PTQ = (
    "| ldm_digits | ptq | W4A4 | 1 | 100 | 0.400 | 0.670 | — | 0.380 | 0.3443 | 23.11 | 0.8523 | — | 4.00 |"
)


def test_embedded_sweep_writes_quality_and_cost_tables(tmp_path, make_cfg, capsys):
    from hydra.utils import instantiate

    s = tmp_path / "sweep"
    common = dict(
        model="ldm_digits", experiment="embedded_digits", calibrate_s=1.5, sample_s=2.0, peak_rss_mb=900.0
    )
    write_job(s, "0", fid=0.3, inception_score=7.7, fid_to_fp=0.0, **common)
    write_job(
        s,
        "1",
        method="ptq",
        weight_bits=4,
        act_bits=4,
        fid=0.4,
        sfid=0.67,
        fid_to_fp=0.38,
        lpips_digits=0.3443,
        psnr=23.11,
        ssim=0.8523,
        erracc_accumulated_error_final=4.0,
        ptq_calib_s=12.0,
        **common,
    )
    from diffquant.sample_sheets import save_samples

    for job in ("0", "1"):  # the jobs' grid images: the sample sheet's rows
        save_samples(torch.rand(4, 1, 8, 8), s / job)
    cfg = make_cfg(["experiment=embedded_digits", "sweep=embedded", f"hydra.sweep.dir={s}"])
    for name in ("table", "cost_table"):
        instantiate(cfg.hydra.callbacks[name]).on_multirun_end(config=cfg)
    assert [p.name for p in s.glob("samples_*.png")] == ["samples_ldm_digits_W4A4.png"]
    assert not list((s / "cost").glob("samples_*.png"))  # the quality table's, written once
    quality = (s / "table.md").read_text()
    assert "| FID | sFID | IS | FID→FP | LPIPS (digits) | PSNR | SSIM | CLIP | final traj. err |" in quality
    assert ROW_PTQ in quality
    cost = (s / "cost" / "table.md").read_text()
    assert "| calib. s | PTQ s |" in cost and "| ldm_digits | ptq | W4A4 | 1 | 100 | 1.5 | 12.0 |" in cost
    assert f"[diffquant] table -> {s / 'cost' / 'table.csv'}" in capsys.readouterr().out


def test_table_callback_never_fails_a_finished_sweep(tmp_path, capsys):
    from omegaconf import OmegaConf

    from diffquant.tables import TableCallback

    empty = tmp_path / "empty"
    empty.mkdir()
    TableCallback(out="cost", metrics=["fid"]).on_multirun_end(
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}})
    )
    err = capsys.readouterr().err
    assert "table not written" in err and f"python -m diffquant.tables {empty} --out {empty / 'cost'}" in err
    assert not list(empty.iterdir())
    with pytest.raises(ValueError, match="choose from"):
        TableCallback(formats=["pdf"])


def calib_sweep(tmp_path, eval_seeds=(0, 1)) -> Path:
    """ptq at W4A4 over calibration seeds 0-2 x ``eval_seeds``, the FP row over the evaluation
    seeds (jobs written before calib_seed was recorded: no key), one quest job."""
    s = tmp_path / "sweep"
    common = dict(model="ldm_digits", experiment="embedded_digits")
    fid = {(0, 0): 1.0, (1, 0): 2.0, (2, 0): 3.0, (0, 1): 1.5, (1, 1): 3.5, (2, 1): 4.0}
    for e in eval_seeds:
        write_job(s, f"fp_s{e}", seed=e, fid=[0.3, 0.35][e], **common)
        for c in range(3):
            write_job(
                s, f"ptq_s{e}_c{c}", method="ptq", weight_bits=4, act_bits=4, seed=e, calib_seed=c,
                fid=fid[c, e], **common,
            )  # fmt: skip
    write_job(s, "quest", method="quest", weight_bits=4, act_bits=4, calib_seed=0, fid=0.5, **common)
    return s


def test_calibration_and_evaluation_seeds_are_separate_spreads(tmp_path):
    """Known values: ptq's FID at (calib seed, eval seed) = (0,0) 1.0, (1,0) 2.0, (2,0) 3.0,
    (0,1) 1.5, (1,1) 3.5, (2,1) 4.0. Mean 2.5; over calibration seeds the variances are 1.0 (eval
    seed 0) and 1.75 (eval seed 1), pooled √1.375 = 1.1726; over evaluation seeds 0.125, 1.125,
    0.5, pooled √(1.75/3) = 0.7638."""
    table = build_table(calib_sweep(tmp_path), metrics=["fid"])
    ptq = next(r for r in table.rows if r.method == "ptq")
    stat = ptq.ours["fid"]
    assert (ptq.calib_seeds, ptq.seeds, stat.n) == ([0, 1, 2], [0, 1], 6)
    assert stat.mean == pytest.approx(2.5)
    assert stat.calib_std == pytest.approx(1.375**0.5) and stat.eval_std == pytest.approx((1.75 / 3) ** 0.5)

    md = render_markdown(table)
    assert "| Model | Method | W/A | calib seeds | eval seeds | n | FID | FID ± eval |" in md
    assert "| ldm_digits | ptq | W4A4 | 3 | 2 | 100 | 2.50 ± 1.17 | 0.76 |" in md
    assert "| ldm_digits | fp | W32A32 | 1 | 2 | 100 | 0.325 | 0.035 |" in md  # no calibration spread
    assert "| ldm_digits | quest | W4A4 | 1 | 1 | 100 | 0.500 |  |" in md
    assert "± std over calibration seeds (calib_seed) at a fixed evaluation seed" in md
    assert "± eval: std over evaluation seeds (seed)" in md

    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--metrics", "fid"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert rows["ptq"]["calib_seeds"] == "0 1 2" and rows["ptq"]["eval_seeds"] == "0 1"
    assert float(rows["ptq"]["fid_ours_std"]) == pytest.approx(1.172604, rel=1e-5)
    assert float(rows["ptq"]["fid_eval_std"]) == pytest.approx(0.763763, rel=1e-5)
    assert rows["fp"]["fid_ours_std"] == "" and float(rows["fp"]["fid_eval_std"]) == pytest.approx(
        0.0353553, rel=1e-5
    )
    tex = (out / "table.tex").read_text()
    assert r"FID $\pm$ eval" in tex and r"2.50 $\pm$ 1.17 & 0.76" in tex
    assert r"$\pm$ std over calibration seeds (calib\_seed)" in tex


def test_one_evaluation_seed_shows_the_calibration_spread_only(tmp_path):
    md = render_markdown(build_table(calib_sweep(tmp_path, eval_seeds=(0,)), metrics=["fid"]))
    assert "| Model | Method | W/A | calib seeds | eval seeds | n | FID |\n" in md  # no ± eval column
    assert "| ldm_digits | ptq | W4A4 | 3 | 1 | 100 | 2.00 ± 1.00 |" in md
    assert "± eval" not in md


def test_calib_seed_0_everywhere_keeps_the_table_as_it_was(tmp_path):
    """Jobs that record calib_seed 0 (and jobs from before it was recorded) give the table of
    before: one `seeds` column, mean ± std over evaluation seeds."""
    s = tmp_path / "sweep"
    common = dict(model="ldm_digits", experiment="embedded_digits", method="ptq", weight_bits=4, act_bits=4)
    write_job(s, "0", seed=0, calib_seed=0, fid=1.0, **common)
    write_job(s, "1", seed=1, fid=2.0, **common)
    md = render_markdown(build_table(s, metrics=["fid"]))
    assert "| Model | Method | W/A | seeds | n | FID |" in md
    assert "| ldm_digits | ptq | W4A4 | 2 | 100 | 1.50 ± 0.71 |" in md
    assert "mean ± std over seeds; n = samples per job." in md


def test_the_new_metrics_are_columns_with_their_headers(tmp_path):
    """sFID, PSNR, SSIM and the digits LPIPS stand-in: default columns of a table without a
    published one, under their own headers and decimals; AccuQuant's published sFID / LPIPS /
    PSNR / SSIM join ours."""
    s = tmp_path / "sweep"
    common = dict(model="ldm_digits", experiment=None, fid=0.3, inception_score=7.7, sfid=1.234)
    write_job(s, "0", fid_to_fp=0.0, psnr=100.0, ssim=1.0, lpips_digits=0.0, **common)
    write_job(
        s, "1", method="ptq", weight_bits=4, act_bits=8, fid_to_fp=0.2, psnr=31.4159, ssim=0.98765,
        lpips_digits=0.0123456, **common,
    )  # fmt: skip
    md = render_markdown(build_table(s))
    head = "| Model | Method | W/A | seeds | n | FID | sFID | IS | FID→FP | LPIPS (digits) | PSNR | SSIM |"
    assert head in md
    assert (
        "| ldm_digits | ptq | W4A8 | 1 | 100 | 0.300 | 1.23 | 7.70 | 0.200 | 0.0123 | 31.42 | 0.9877 |" in md
    )
    a = tmp_path / "accuquant"
    write_job(
        a, "0", experiment="accuquant_imagenet", method="accuquant", weight_bits=4, act_bits=8,
        fid=9.0, sfid=7.0, inception_score=350.0, fid_to_fp=0.6, lpips=0.16, psnr=24.5, ssim=0.87,
    )  # fmt: skip
    row = next(r for r in build_table(a).rows if r.key == ("ldm_imagenet", "accuquant", "W4A8"))
    assert row.paper["sfid"] == 7.41 and row.paper["psnr"] == 24.4338
    assert row.diff("ssim") == pytest.approx(0.87 - 0.8713)


def test_guard_decisions_are_counted_per_row_and_written_beside_the_table(tmp_path):
    """Every ``<guard>_guard_kept`` of a row's jobs is counted (base k of n) in ``guards.md``;
    a sweep without guards gets no such file."""
    from diffquant.tables import guard_decisions, write_table

    s = tmp_path / "guarded"
    bits = dict(weight_bits=4, act_bits=4, fid_to_fp=0.1)
    write_job(s, "0_fp", fid_to_fp=0.0)
    for c, (init, final) in enumerate([("base", "final"), ("final", "final"), ("base", "base")]):
        write_job(
            s,
            f"q{c}",
            method="quest",
            calib_seed=c,
            quest_init_guard_kept=init,
            quest_guard_kept=final,
            **bits,
        )
        write_job(s, f"p{c}", method="ptq", calib_seed=c, ptq_lsq_guard_kept="base" if c else "final", **bits)
    t = build_table(s, metrics=["fid_to_fp"])
    got = [(r.method, g, base, n) for r, g, base, n in guard_decisions(t)]
    assert got == [("ptq", "ptq_lsq", 2, 3), ("quest", "quest", 1, 3), ("quest", "quest_init", 2, 3)]
    written = write_table(t, tmp_path / "out", ["md"], sheets=False)
    text = written["guards"].read_text()
    assert "| ldm_imagenet | quest | W4A4 | quest_init | 2 | 3 |" in text
    plain = tmp_path / "plain"
    write_job(plain, "0_fp", fid_to_fp=0.0)
    assert "guards" not in write_table(build_table(plain, metrics=["fid_to_fp"]), plain, ["md"], sheets=False)


def test_saved_results_folder_of_job_files_is_read_like_the_sweep(sweep, tmp_path):
    """``experiments/results/<table>/jobs/``: one ``<job>.json`` per job, no ``metrics.json``."""
    saved = tmp_path / "jobs"
    saved.mkdir()
    for path in sweep.rglob("metrics.json"):
        (saved / f"{path.parent.name}.json").write_text(path.read_text())
    a, b = build_table(sweep), build_table(saved)
    assert render_markdown(a).replace(str(sweep), "") == render_markdown(b).replace(str(saved), "")
