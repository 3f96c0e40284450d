"""The report's Pareto frontier and findings, on frames built by hand: which points are on the
frontier, which family is best at a budget, and each claim's verdict from the numbers."""

import pandas as pd
import pytest

from mmskip.report.build import summary_frame
from mmskip.report.findings import FAILS, HOLDS, UNTESTED, findings
from mmskip.report.frontier import best_at_budgets, frontier_points, on_frontier


def skip(task, key, mode, scope, pct, prefill=1.0, decode=1.0, blocks=0, ms=None, semantics="textbook"):
    metric = "accuracy" if task.endswith("qa") else "CIDEr"
    return {"task": task, "modality": "image", "family": "skip", "metric": metric, "score": pct / 100,
            "pct_of_baseline": pct, "skip_mode": mode, "skip_semantics": semantics, "skip_scope": scope,
            "skipped_blocks": blocks, "prefill_flops_fraction": prefill, "decode_flops_fraction": decode,
            "decode_ms_per_token": ms, "point": key}


def trained(task, key, pct, params=600, sparsity=0.0, blocks=None, with_compression=True, decode=1.0):
    metric = "accuracy" if task.endswith("qa") else "CIDEr"
    return {"task": task, "modality": "image", "family": "trained", "metric": metric, "score": pct / 100,
            "pct_of_baseline": pct, "trained_with_compression": with_compression, "llm_params": params,
            "sparsity": sparsity, "skipped_blocks": blocks, "prefill_flops_fraction": decode,
            "decode_flops_fraction": decode, "compression": "none", "point": key}


def points(rows):
    return pd.DataFrame(rows, columns=["family", "label", "pct", "prefill", "decode", "time"])


def test_the_frontier_keeps_the_points_nothing_beats_and_the_first_of_equal_ones():
    p = points([("a", "full", 100.0, 1.0, 1.0, None), ("a", "cheap", 80.0, 0.5, 1.0, None),
                ("b", "worse", 70.0, 0.6, 1.0, None), ("b", "same as cheap", 80.0, 0.5, 1.0, None),
                ("c", "cheaper, worse", 60.0, 0.4, 1.0, None), ("c", "costlier, same", 100.0, 1.2, 1.0, None)])
    assert on_frontier(p, "prefill") == [True, True, False, False, True, False]
    best = best_at_budgets(p, "prefill", (0.3, 0.5, 0.9, 1.0))
    assert best[0]["best"] is None
    assert [b["best"]["label"] for b in best[1:]] == ["cheap", "cheap", "full"]
    # a point without the cost (time not measured) is never on that frontier
    assert on_frontier(p, "time") == [False] * 6


def test_frontier_points_place_every_family_by_what_it_executes():
    frame = summary_frame([
        skip("vqa", "baseline", "none", None, 100.0, ms=10.0),
        skip("vqa", "skip_block-generated-k2-s1", "skip_block", "generated", 95.0, decode=0.7, blocks=2, ms=7.0),
        skip("vqa", "parallel_attn_ffn-all-k2-s1", "parallel_attn_ffn", "all", 99.0, ms=9.0),
        skip("vqa", "drop_last-1", "drop_last", "all", 90.0, 0.8, 0.8, 1, ms=8.0),
        {"task": "vqa", "modality": "image", "family": "compress", "metric": "accuracy", "score": 0.8,
         "pct_of_baseline": 97.0, "compression": "wanda", "sparsity": 0.5, "sparsity_pattern": "2:4",
         "calibration": "prompt", "point": "vqa/prompt/2:4"},
        trained("vqa", "baseline", 100.0, with_compression=False),
        trained("vqa", "small/trained", 60.0, params=150),
        trained("vqa", "skipped/trained", 93.0, blocks=2, decode=0.7),
        trained("vqa", "skipped/inference_only", 80.0, blocks=2, decode=0.7, with_compression=False)])
    p = frontier_points(frame, "vqa").set_index("label")
    assert p.loc["unskipped", ["pct", "prefill", "decode", "time"]].tolist() == [100.0, 1.0, 1.0, 1.0]
    assert p.loc["skip_block-generated-k2-s1", ["family", "decode", "time"]].tolist() == ["static skip", 0.7, 0.7]
    assert p.loc["parallel_attn_ffn-all-k2-s1", "family"] == "parallel"
    assert p.loc["drop_last-1", "family"] == "layer dropping"
    assert p.loc["wanda 0.50 2:4", ["family", "prefill", "decode"]].tolist() == ["pruning", 1.0, 1.0]
    assert pd.isna(p.loc["wanda 0.50 2:4", "time"])
    assert p.loc["150 parameters", ["family", "decode"]].tolist() == ["smaller LLM", 0.25]
    assert p.loc["skipped/trained", ["family", "pct"]].tolist() == ["trained with compression", 93.0]
    assert "skipped/inference_only" not in p.index  # the inference-only twin is the skip grid's point


def _claim(frame, n, tasks, layers=6, spread=None):
    (claim,) = [c for c in findings(frame, tasks, {t: layers for t in tasks}, spread) if c["claim"] == n]
    return claim


def test_claim_one_needs_a_third_of_the_blocks_skipped_for_generated_tokens():
    rows = [skip("vqa", "baseline", "none", None, 100.0),
            skip("vqa", "skip_block-generated-k3-s1", "skip_block", "generated", 99.0, blocks=1),
            skip("vqa", "skip_block-generated-k2-s1", "skip_block", "generated", 92.0, blocks=2),
            skip("vqa", "skip_block-all-k2-s1", "skip_block", "all", 95.0, blocks=2)]
    claim = _claim(summary_frame(rows), 1, ["vqa"])
    assert claim["verdict"] == HOLDS and claim["rows"][0]["margin"] == 2.0
    assert "skip_block-generated-k2-s1 (2 blocks) keeps 92.0%" in claim["rows"][0]["numbers"]
    rows[2]["pct_of_baseline"] = 85.0
    assert _claim(summary_frame(rows), 1, ["vqa"])["verdict"] == FAILS
    # within the spread over seeds it decides nothing
    claim = _claim(summary_frame(rows), 1, ["vqa"], spread={"vqa": 6.0})
    assert claim["verdict"] == UNTESTED and "within the seeds' spread (6.0 points)" in claim["rows"][0]["noise"]
    # no plan skips a third of 9 blocks: not tested
    assert _claim(summary_frame(rows), 1, ["vqa"], layers=9)["verdict"] == UNTESTED


def test_claims_two_and_three_compare_matched_plans():
    rows = [skip(t, "baseline", "none", None, 100.0) for t in ("vqa", "caption")]
    for t, pcts in (("vqa", (90.0, 60.0)), ("caption", (80.0, 40.0))):
        rows += [skip(t, "skip_block-generated-k2-s1", "skip_block", "generated", pcts[0], blocks=2),
                 skip(t, "parallel_attn_ffn-generated-k2-s1", "parallel_attn_ffn", "generated", pcts[1])]
    frame = summary_frame(rows)
    two = _claim(frame, 2, ["vqa", "caption"])
    assert two["verdict"] == HOLDS and two["rows"][0]["margin"] == 15.0  # vqa 75.0 on average, caption 60.0
    three = _claim(frame, 3, ["vqa", "caption"])
    assert three["verdict"] == FAILS and [r["margin"] for r in three["rows"]] == [-30.0, -40.0]
    assert "more in 0 of them" in three["rows"][0]["numbers"]


def test_claims_four_and_five_are_untested_at_another_setting_than_the_claims():
    rows = [trained("vqa", "baseline", 100.0, with_compression=False),
            trained("vqa", "dense/trained", 100.0),
            trained("vqa", "pruned/trained", 98.0, sparsity=0.5),
            trained("vqa", "skipped/trained", 97.5, blocks=3, decode=0.6),
            trained("vqa", "small/trained", 99.0, params=250)]
    frame = summary_frame(rows)
    four = {r["where"]: r for r in _claim(frame, 4, ["vqa"])["rows"]}
    assert four["vqa, skipped"]["verdict"] == HOLDS and four["vqa, skipped"]["margin"] == 0.5
    assert four["vqa, pruned"]["verdict"] == UNTESTED and four["vqa, pruned"]["setting"] == \
        "ran sparsity 0.5, the claim 0.7"
    # the default's mask at 0.7: 67 of each row's 96 weights, 0.698 achieved, is the claim's setting (within a point)
    rows[2]["sparsity"] = 67 / 96
    pruned = {r["where"]: r for r in _claim(summary_frame(rows), 4, ["vqa"])["rows"]}["vqa, pruned"]
    assert pruned["verdict"] == HOLDS and pruned["setting"] == "" and "at sparsity 0.697917" in pruned["numbers"]
    rows[2]["sparsity"] = 0.5
    five = _claim(frame, 5, ["vqa"])
    assert five["verdict"] == HOLDS and "scores 99.0% of dense/trained (600)" in five["rows"][0]["numbers"]
    rows[-1]["llm_params"] = 100  # 6 times smaller: not the claim's setting
    assert _claim(summary_frame(rows), 5, ["vqa"])["rows"][0]["setting"] == \
        "the larger LLM has 6.0 times the parameters, the claim 2 to 3"


@pytest.mark.parametrize("claim", [1, 2, 3, 4, 5])
def test_a_claim_whose_families_did_not_run_is_not_tested(claim):
    frame = summary_frame([skip("vqa", "baseline", "none", None, 100.0)])
    assert _claim(frame, claim, ["vqa"])["verdict"] == UNTESTED


def test_the_compression_plots_labels_never_overlap():
    from matplotlib.text import Text

    from mmskip.report.compression import sparsity_plot
    from mmskip.report.records import headline_rows

    def mask(compression, pattern, calibration, pct, sparsity=0.5):
        return {"task": "vqa", "modality": "image", "family": "compress", "metric": "accuracy", "score": pct / 100,
                "pct_of_baseline": pct, "compression": compression, "sparsity": sparsity,
                "sparsity_pattern": pattern, "calibration": calibration,
                "point": "baseline" if compression == "none" else f"{compression}/{pattern}/{calibration}"}

    # at 0.5 sparsity: N:M masks, α-SubNet rules and other calibrations within a point of each other
    rows = [mask("none", None, None, 100.0, 0.0)]
    rows += [mask(m, "unstructured", c, 90.0 + 0.3 * i) for i, (m, c) in enumerate(
        [("magnitude", None), ("wanda", "prompt"), ("wanda", "text"), ("wanda", "prompt_answer"),
         ("subnet:intersection", "prompt"), ("subnet:union", "prompt"), ("subnet:majority", "prompt")])]
    rows += [mask(m, p, c, 89.5 + 0.2 * i) for i, (m, p, c) in enumerate(
        [("magnitude", "2:4", None), ("magnitude", "4:8", None), ("wanda", "2:4", "prompt"),
         ("wanda", "4:8", "prompt")])]
    figure = sparsity_plot("vqa", headline_rows(summary_frame(rows), "compress", "vqa"))
    figure.canvas.draw()  # the labels' positions as rendered
    renderer = figure.canvas.get_renderer()
    texts = figure.axes[0].texts
    assert len(texts) == 9  # 4 N:M masks, 3 α-SubNet rules, 2 other calibrations (text, prompt_answer)
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes))
                   for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []
    axes = figure.axes[0].get_window_extent(renderer)
    assert all(axes.y0 <= b.y0 and b.y1 <= axes.y1 for b in boxes)


def test_a_task_whose_baseline_scores_zero_has_no_percentages_to_place_or_judge():
    # the smoke run's tiny model can caption with CIDEr 0: no percentage of a zero score (summary.csv leaves it empty)
    rows = [skip("caption", "baseline", "none", None, 100.0), skip("vqa", "baseline", "none", None, 100.0)]
    rows += [skip("caption", "skip_block-generated-k2-s1", "skip_block", "generated", 0.0, blocks=2),
             skip("caption", "parallel_attn_ffn-generated-k2-s1", "parallel_attn_ffn", "generated", 0.0),
             skip("vqa", "skip_block-generated-k2-s1", "skip_block", "generated", 90.0, blocks=2),
             skip("vqa", "parallel_attn_ffn-generated-k2-s1", "parallel_attn_ffn", "generated", 95.0),
             trained("caption", "baseline", 0.0, with_compression=False), trained("caption", "dense/trained", 0.0),
             trained("caption", "small/trained", 0.0, params=250)]
    for r in rows:
        if r["task"] == "caption" and r["point"] != "baseline":
            r["pct_of_baseline"] = None
    frame = summary_frame(rows)
    assert list(frontier_points(frame, "caption")["label"]) == ["unskipped"]
    claims = {c["claim"]: c for c in findings(frame, ["caption", "vqa"], {"caption": 6, "vqa": 6})}
    assert [r["where"] for r in claims[3]["rows"]] == ["caption", "vqa"]
    assert claims[3]["rows"][0]["verdict"] == UNTESTED and claims[3]["rows"][1]["margin"] == 5.0
    assert claims[2]["rows"][0]["verdict"] == UNTESTED  # no plan with a percentage on both
    assert claims[5]["rows"][0]["verdict"] == UNTESTED and claims[5]["rows"][0]["margin"] is None


def token(task, kind, layer, pct, prefill=1.0, decode=1.0, keep=None, rate=None, time=None):
    metric = "accuracy" if task.endswith("qa") else "CIDEr"
    key = f"{kind}-l{layer}" + (f"-keep{keep:g}" if keep else "") + (f"-r{rate:g}" if rate else "")
    return {"task": task, "modality": "image", "family": "tokens", "metric": metric, "score": pct / 100,
            "pct_of_baseline": pct, "token_kind": kind, "token_layer": layer, "visual_keep": keep, "exit_rate": rate,
            "prefill_flops_fraction": prefill, "decode_flops_fraction": decode, "decode_time_fraction": time,
            "point": key}


def test_token_points_join_the_frontier_as_their_own_families():
    frame = summary_frame([skip("vqa", "baseline", "none", None, 100.0, ms=10.0),
                           token("vqa", "visual_exit", 1, 96.0, prefill=0.6, decode=0.9, time=0.8),
                           token("vqa", "fastv", 1, 99.0, prefill=0.8, keep=0.5),
                           token("vqa", "early_exit", 2, 97.0, decode=0.7, rate=0.5, time=0.75)])
    p = frontier_points(frame, "vqa").set_index("label")
    assert p.loc["visual_exit-l1", ["family", "prefill", "decode", "time"]].tolist() == [
        "visual-token exit", 0.6, 0.9, 0.8]
    assert p.loc["fastv-l1-keep0.5", "family"] == "FastV" and pd.isna(p.loc["fastv-l1-keep0.5", "time"])
    assert p.loc["early_exit-l2-r0.5", ["family", "decode"]].tolist() == ["early exit", 0.7]
    assert on_frontier(frontier_points(frame, "vqa"), "prefill") == [True, True, True, False]


def test_claim_six_reads_visual_exit_after_a_third_of_the_blocks():
    rows = [token("vqa", "visual_exit", 1, 93.0, prefill=0.5), token("vqa", "visual_exit", 3, 99.0, prefill=0.8)]
    claim = _claim(summary_frame(rows), 6, ["vqa"])  # 6 layers: a third is 2 blocks, after layer 1
    assert claim["verdict"] == HOLDS and claim["rows"][0]["margin"] == 3.0
    assert "visual_exit-l1" in claim["rows"][0]["numbers"]
    other = _claim(summary_frame(rows[1:]), 6, ["vqa"])  # run at layer 3 only: not the claim's setting
    assert other["verdict"] == UNTESTED and other["rows"][0]["setting"].startswith("ran layer 3")
    assert _claim(summary_frame([skip("vqa", "baseline", "none", None, 100.0)]), 6, ["vqa"])["rows"] == []


def test_claim_seven_is_fastv_after_layer_two_keeping_half():
    rows = [token("vqa", "fastv", 1, 95.0, keep=0.5), token("vqa", "fastv", 1, 99.0, keep=0.25)]
    claim = _claim(summary_frame(rows), 7, ["vqa"])
    assert claim["verdict"] == FAILS and claim["rows"][0]["margin"] == -2.0
    assert _claim(summary_frame(rows[1:]), 7, ["vqa"])["verdict"] == UNTESTED


def test_claim_eight_compares_early_exit_with_static_skips_at_no_more_decode_flops():
    rows = [skip("vqa", "skip_block-generated-k2-s1", "skip_block", "generated", 90.0, decode=0.6, blocks=2),
            skip("vqa", "skip_block-generated-k3-s1", "skip_block", "generated", 96.0, decode=0.8, blocks=1),
            skip("vqa", "skip_attn-generated-k2-s1", "skip_attn", "generated", 99.0, decode=0.5, blocks=2),
            token("vqa", "early_exit", 2, 95.0, decode=0.65, rate=0.5),   # vs k2 (0.6, 90%): +5
            token("vqa", "early_exit", 4, 95.0, decode=0.85, rate=0.25)]  # vs k3 (0.8, 96%): -1
    claim = _claim(summary_frame(rows), 8, ["vqa"])
    assert claim["verdict"] == HOLDS and claim["rows"][0]["margin"] == 2.0  # skip_attn is not block skipping
    cheap = _claim(summary_frame(rows[:2] + [token("vqa", "early_exit", 2, 95.0, decode=0.5, rate=0.5)]), 8, ["vqa"])
    assert cheap["verdict"] == UNTESTED and "no skip_block plan" in cheap["rows"][0]["numbers"]


def test_the_spread_over_seeds_is_the_range_of_each_tasks_baseline_in_points_of_the_first_seeds(tmp_path):
    import json

    from mmskip.report.build import seed_spread

    def write(folder, task, score, n=10):
        folder.mkdir(parents=True)
        metric = "accuracy" if task.endswith("qa") else "CIDEr"
        (folder / "metrics.json").write_text(json.dumps({"task": task, "num_examples": n, "scores": {metric: score}}))
        return folder

    first = [write(tmp_path / "baseline/vqa", "vqa", 0.80), write(tmp_path / "baseline/caption", "caption", 2.0)]
    replicas = [write(tmp_path / "seeds/1/vqa", "vqa", 0.76), write(tmp_path / "seeds/2/vqa", "vqa", 0.82),
                write(tmp_path / "seeds/1/caption", "caption", 2.0),
                write(tmp_path / "seeds/2/caption", "caption", 1.9)]
    spread, n = seed_spread(first, replicas)
    assert n == 3 and spread["vqa"] == pytest.approx(7.5) and spread["caption"] == pytest.approx(5.0)
    assert seed_spread(first, []) == ({}, 1)
    with pytest.raises(ValueError, match="5 examples, the baseline 10"):
        seed_spread(first, [write(tmp_path / "seeds/3/vqa", "vqa", 0.8, n=5)])
    # a margin within the spread decides nothing: claim 1 at 2 points above its bar, the spread 7.5
    rows = [skip("vqa", "skip_block-generated-k2-s1", "skip_block", "generated", 92.0, blocks=2)]
    claim = _claim(summary_frame(rows), 1, ["vqa"], spread=spread)
    assert claim["verdict"] == UNTESTED and "within the seeds' spread (7.5 points)" in claim["rows"][0]["noise"]
