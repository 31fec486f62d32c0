"""python -m diffquant.compare: side-by-side metrics of two sweeps; non-zero exit on a change."""

import json

from diffquant.compare import main


def write(root, job, **metrics):
    (root / job).mkdir(parents=True)
    (root / job / "metrics.json").write_text(json.dumps(metrics))


def test_equal_sweeps_pass_and_changes_fail(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "0_m_w4a8_ptq_s0", fid=0.3, fid_to_fp=0.01, sample_s=1.0, config_hash="x")
    write(b, "0_m_w4a8_ptq_s0", fid=0.3, fid_to_fp=0.01, sample_s=2.0, config_hash="y")
    assert main([str(a), str(b), "--metrics", "fid,fid_to_fp"]) == 0  # timings and hashes ignored
    write(a, "1_m_w4a4_ptq_s0", fid=0.4, fid_to_fp=0.2)
    write(b, "1_m_w4a4_ptq_s0", fid=0.4, fid_to_fp=0.21, n_quant_layers=3)
    assert main([str(a), str(b), "--metrics", "fid,fid_to_fp"]) == 1
    out = capsys.readouterr().out
    assert "| 1_m_w4a4_ptq_s0 | 0.4 | 0.4 | 0.2 | 0.21 |" in out and "n_quant_layers" in out
    write(a, "2_m_w3a6_ptq_s0", fid=0.5)
    assert main([str(a), str(b), "--metrics", "fid"]) == 1 and "only in A" in capsys.readouterr().out


def test_a_saved_results_folder_compares_by_file_name(tmp_path, capsys):
    a, saved = tmp_path / "a", tmp_path / "jobs"
    write(a, "0_m_w4a8_ptq_s0", fid=0.3, fid_to_fp=0.01)
    saved.mkdir()
    (saved / "0_m_w4a8_ptq_s0.json").write_text(json.dumps({"fid": 0.3, "fid_to_fp": 0.02}))
    assert main([str(a), str(saved), "--metrics", "fid_to_fp"]) == 1
    assert "| 0_m_w4a8_ptq_s0 | 0.01 | 0.02 |" in capsys.readouterr().out
