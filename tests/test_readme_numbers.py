"""README's numbers of the main job are those of the committed run, bench/results/main_job/report.json."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_numbers_in_readme_come_from_the_committed_report():
    readme = ROOT.joinpath("README.md").read_text()
    r = json.loads(ROOT.joinpath("bench/results/main_job/report.json").read_text())
    text = " ".join(readme.split())
    m = re.search(r"(\d+) QAT steps\): FP ([\d.]+)% → W4A4 ([\d.]+)% before / ([\d.]+)% after BN re-estimation, "
                  r"([\d.]+)% of the tracked weights oscillating \(([\d.]+)% of the last depthwise layer's\); "
                  r"(\d+) s", text)
    assert m, "README's main-job sentence not found"
    steps, fp, pre, post, osc, last_dw, secs = m.groups()
    last = [x for x in r["layers"] if x["depthwise"]][-1]
    assert int(steps) == r["steps"]
    assert fp == f"{r['fp_acc']:.2f}" and pre == f"{r['acc_pre_bn']:.2f}" and post == f"{r['acc_post_bn']:.2f}"
    assert osc == f"{r['osc_pct']:.2f}" and last_dw == f"{last['osc_pct']:.2f}"
    assert int(secs) == round(r["timings"]["total_s"])
    assert r["dataset"]["name"] == "fashion-mnist" and r["dataset"]["train_size"] == 20000
