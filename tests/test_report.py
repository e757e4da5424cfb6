"""Report maths and writers: t-intervals, paired tests and bold marks, clipped-no-noise rows, the
accountant columns, LaTeX, the comparison report (deltas, Welch intervals) and `dpfpl report`."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.compare import compare_table, load_source, write_comparison
from bench.frames import from_rows, read_runs_csv
from bench.render import to_latex, to_markdown
from bench.report import runs_csv
from bench.stats import mean_interval, paired_test, t_halfwidth, welch_delta
from bench.tables import accuracy_table, privacy_table, significance_table


def _rows(spec: dict[tuple[str, object], list[float]], **extra) -> list[dict]:
    """{(method, eps): [acc per seed]} -> report rows (seed = position)."""
    out = []
    for (m, eps), accs in spec.items():
        for seed, a in enumerate(accs):
            privacy = "none" if eps is None else "dp"
            out.append({"cell": f"{m}_{eps}_s{seed}", "method": m, "epsilon": eps, "seed": seed, "dataset": "d",
                        "privacy": privacy, "local_acc": a, "neighbor_acc": a, **extra})
    return out


def test_t_interval_is_the_t_quantile_formula():
    x = [0.60, 0.70, 0.80]
    mean, half, n = mean_interval(x)
    assert (mean, n) == (pytest.approx(0.7), 3)
    assert half == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3))  # t_{0.975,2} s / sqrt(n)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3))
    assert math.isnan(mean_interval([0.5])[1]) and math.isnan(t_halfwidth(0.1, 1))


def test_paired_test_matches_scipy_and_degenerate_cases():
    a = pd.Series([0.70, 0.74, 0.69, 0.75], index=[0, 1, 2, 3])
    b = pd.Series([0.66, 0.71, 0.68, 0.70, 0.99], index=[0, 1, 2, 3, 9])  # seed 9 has no pair: ignored
    pt = paired_test(a, b)
    ref = stats.ttest_rel(a.to_numpy(), b.iloc[:4].to_numpy())
    d = a.to_numpy() - b.iloc[:4].to_numpy()
    assert pt.n == 4 and pt.diff == pytest.approx(d.mean()) and pt.p == pytest.approx(ref.pvalue)
    assert pt.half == pytest.approx(stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2)
    assert math.isnan(paired_test(a.iloc[:1], b).p) and not paired_test(a.iloc[:1], b).significant()
    same = paired_test(a, a)
    assert same.p == 1.0 and not same.significant()


def test_bold_only_where_the_paired_test_says_so_and_dpfpl_column():
    # eps 4: dpfpl beats promptfl by 5 points on every seed (+-0.5): significant -> bold.
    # none: dpfpl has the higher mean, but the per-seed differences change sign: not bold.
    rows = _rows({("dpfpl", 4.0): [0.700, 0.755, 0.650], ("promptfl", 4.0): [0.650, 0.700, 0.605],
                  ("dpfpl", None): [0.80, 0.60, 0.72], ("promptfl", None): [0.70, 0.70, 0.70],
                  ("zeroshot", None): [0.50, 0.51, 0.49]})
    df = from_rows(rows, [])
    t = accuracy_table(df, "local_acc", "Local", "local", 3)
    body = t.body.set_index("eps")
    assert list(t.body.columns) == ["dataset", "eps", "Zero-shot", "PromptFL", "DP-FPL", "DP-FPL vs baselines (p<0.05)"]
    assert list(body.index) == ["none", "4"]
    bold = t.bold.set_index(t.body["eps"])
    p4 = stats.ttest_rel([0.700, 0.755, 0.650], [0.650, 0.700, 0.605]).pvalue
    pn = stats.ttest_rel([0.80, 0.60, 0.72], [0.70, 0.70, 0.70]).pvalue
    assert p4 < 0.05 < pn
    assert bold.loc["4", "DP-FPL"] and not bold.loc["none", "DP-FPL"] and not bold.loc["4", "PromptFL"]
    half = stats.t.ppf(0.975, 2) * np.std([0.700, 0.755, 0.650], ddof=1) / math.sqrt(3)
    assert body.loc["4", "DP-FPL"] == f"70.2 ± {100 * half:.1f}"
    assert body.loc["4", "DP-FPL vs baselines (p<0.05)"] == "> Zero-shot, PromptFL"
    # none: vs zero-shot the differences 0.30 / 0.09 / 0.23 give t = 3.35, p = 0.08 with 2 d.o.f.
    assert stats.ttest_rel([0.80, 0.60, 0.72], [0.50, 0.51, 0.49]).pvalue > 0.05
    assert body.loc["none", "DP-FPL vs baselines (p<0.05)"] == "none significant"
    assert body.loc["4", "Zero-shot"] == body.loc["none", "Zero-shot"]  # zero-shot on every eps row
    assert "**" in to_markdown(t).split("| d | 4 |")[1].splitlines()[0]
    sig = significance_table(df, "local_acc", "vs", "local_vs_dpfpl").data
    r = sig[(sig["level"] == "4") & (sig["series"] == "promptfl")].iloc[0]
    assert r["p"] == pytest.approx(p4) and r["diff_pct"] == pytest.approx(100 * np.mean([0.05, 0.055, 0.045]))
    assert bool(r["significant"])


def test_clipped_no_noise_row_and_infinite_eps(tmp_path):
    # summary.json writes infinite eps as Infinity: read as float inf, never as missing
    rec = json.loads('{"epsilon_spent": Infinity, "epsilon_pld": Infinity}')
    assert rec["epsilon_spent"] == math.inf
    rows = _rows({("dpfpl", None): [0.7, 0.7], ("dpfpl", "clip"): [0.72, 0.74], ("dpfpl", 4.0): [0.69, 0.7]},
                 epsilon_rdp=math.inf, epsilon_pld=math.inf)
    df = from_rows(rows, [])
    assert list(df["level"].unique()) == ["none", "clip", "4"] and df[df["level"] == "clip"]["epsilon"].iloc[0] == math.inf
    t = accuracy_table(df, "local_acc", "Local", "local", 2)
    assert list(t.body["eps"]) == ["none", "clipped, no noise", "4"]
    priv = privacy_table(df).body
    clip = priv[priv["eps target"] == "clipped, no noise"].iloc[0]
    assert clip["eps RDP"] == "∞" and clip["eps PLD"] == "∞"
    # the CSV keeps the level and reads back identically
    (tmp_path / "runs.csv").write_text(runs_csv(rows, []))
    back = read_runs_csv(tmp_path / "runs.csv")
    assert list(back["level"]) == list(df["level"]) and back["epsilon_rdp"].iloc[0] == math.inf


def test_privacy_table_accountants_side_by_side_and_absent_fields():
    rows = _rows({("dpfpl", 4.0): [0.7, 0.7]}, epsilon_rdp=4.0, epsilon_pld=3.1, accountant="pld")
    rows += _rows({("fedpgp", 4.0): [0.6, 0.6]})  # an older summary: no PLD, no accountant
    t = privacy_table(from_rows(rows, []))
    assert list(t.body.columns[:7]) == ["dataset", "method", "eps target", "eps RDP", "eps PLD", "calibrated by",
                                       "eps claimed"]
    b = t.body.set_index("method")
    assert (b.loc["DP-FPL", "eps RDP"], b.loc["DP-FPL", "eps PLD"], b.loc["DP-FPL", "calibrated by"]) == ("4", "3.1", "pld")
    assert (b.loc["FedPGP", "eps RDP"], b.loc["FedPGP", "eps PLD"], b.loc["FedPGP", "calibrated by"]) == ("-", "-", "-")
    assert "calibrated by" not in privacy_table(from_rows(_rows({("dpfpl", 4.0): [0.7]}), [])).body.columns


def test_latex_booktabs_bold_and_escaping():
    rows = _rows({("dpfpl", 4.0): [0.700, 0.755, 0.650], ("promptfl", 4.0): [0.650, 0.700, 0.605]})
    tex = to_latex(accuracy_table(from_rows(rows, []), "local_acc", "Local acc_x", "local", 3))
    lines = tex.splitlines()
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert r"\label{tab:local}" in tex and r"Local acc\_x" in tex and r"95\%" in tex
    row = next(x for x in lines if x.startswith("d & 4"))
    assert row.count("&") == 4 and r"\textbf{70.2 $\pm$" in row and row.endswith(r"\\")
    assert "±" not in tex and "|" not in tex.split(r"\begin{tabular}")[1].split("}")[0]


def test_compare_deltas_are_differences_with_welch_intervals(tmp_path):
    a = _rows({("dpfpl", 4.0): [0.60, 0.62, 0.64], ("dpfpl", None): [0.7, 0.7, 0.7]})
    b = _rows({("dpfpl", 4.0): [0.70, 0.71, 0.75, 0.74]})
    for name, rows in (("old", a), ("new", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "runs.csv").write_text(runs_csv(rows, []))
    frames = {lab: df for lab, df in (load_source(str(tmp_path / "old")), load_source(str(tmp_path / "new")))}
    t = compare_table(frames, "local_acc", "Local", "compare_local")
    r = t.data[t.data["level"] == "4"].iloc[0]
    d1, d0 = [0.70, 0.71, 0.75, 0.74], [0.60, 0.62, 0.64]
    assert r["delta_new_pct"] == pytest.approx(100 * (np.mean(d1) - np.mean(d0)))
    v1, v0 = np.var(d1, ddof=1) / 4, np.var(d0, ddof=1) / 3
    nu = (v1 + v0) ** 2 / (v1 ** 2 / 3 + v0 ** 2 / 2)
    assert r["delta_new_ci95_pct"] == pytest.approx(100 * stats.t.ppf(0.975, nu) * math.sqrt(v1 + v0))
    assert t.bold[t.body["eps"] == "4"].iloc[0, -1]  # the interval excludes 0
    assert t.body[t.body["eps"] == "none"].iloc[0, -1] == "-"  # no such cell in the second folder
    # a published number adds no spread: the interval is the folder's own t-interval
    assert welch_delta(0.7, 0.02, 3, 0.65, 0.0, 1)[1] == pytest.approx(stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3))
    files = write_comparison([str(tmp_path / "old"), str(tmp_path / "new")], tmp_path / "cmp")
    for name in ("README.md", "table_compare_local.tex", "table_compare_local.csv", "acc_vs_eps.png"):
        assert name in files and files[name].is_file()


def test_compare_against_paper_preset():
    lab, df = load_source("preset:paper")
    r = df[(df["dataset"] == "caltech101") & (df["level"] == "0.1") & (df["method"] == "dpfpl")].iloc[0]
    assert r["local_acc"] == pytest.approx(0.9271) and r["neighbor_acc"] == pytest.approx(0.9002)


def test_report_cli_bad_input_one_line_exit_2(tmp_path, capsys):
    from dpfpl.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "empty") in err[0] and "runs.csv" in err[0]
    assert main(["report", "preset:audits", "--out", str(tmp_path / "o")]) == 2


def test_reads_runs_csv_written_before_levels(tmp_path):
    """An older runs.csv (no level column; reference mode in `privacy`) reads as the same levels and series."""
    (tmp_path / "runs.csv").write_text(
        "cell,method,epsilon,seed,dataset,privacy,local_acc,neighbor_acc\n"
        "a,dpfpl,,0,synthetic,none,0.7,0.5\nb,dpfpl,4.0,0,synthetic,dp,0.72,0.5\n"
        "c,dpfpl,4.0,0,synthetic,reference,0.66,0.5\n")
    df = read_runs_csv(tmp_path / "runs.csv")
    assert list(df["level"]) == ["none", "4", "4"] and list(df["series"]) == ["dpfpl", "dpfpl", "dpfpl+ref"]
    assert df.attrs["axes"] == [] and math.isnan(df["epsilon"].iloc[0]) and df["epsilon"].iloc[1] == 4.0
