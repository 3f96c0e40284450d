"""Pruning masks and the α-SubNet on tiny random OPT and LLaMA models."""

import copy
import json

import pytest
import torch

from mmskip.compression.pruning import (PruneSpec, apply_masks, load_masks, mask_from_scores, mask_metadata,
                                        mask_sparsity, prune,
                                        prunable_linears, save_masks, scores_for)
from mmskip.compression.subnet import combine, iou, iou_per_block
from test_skipping import tiny

FAMILIES = ("opt", "llama")


def calibration(model, seed=3):
    """Two right-padded batches of random input embeddings."""
    g = torch.Generator().manual_seed(seed)
    dim = model.get_input_embeddings().embedding_dim
    batches = []
    for lengths in ((6, 3, 5), (4, 7)):
        width = max(lengths)
        embeds = torch.randn(len(lengths), width, dim, generator=g)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        batches.append((embeds, mask))
    return batches


def test_wanda_score_and_row_selection_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    norm = torch.tensor([4.0, 1.0, 1.0, 0.5])
    s = scores_for("wanda", w, norm)
    assert s.tolist() == [[4.0, 2.0, 3.0, 2.0], [16.0, 3.0, 2.0, 0.5]]
    keep = mask_from_scores(s, PruneSpec("wanda", 0.5), per_row=True)
    # row 0: the two lowest are 2.0 (index 1) and 2.0 (index 3): ties prune both; row 1: 0.5 and 2.0
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    # magnitude compares the whole layer: the 4 lowest |w| of 8 go, wherever they are
    keep = mask_from_scores(scores_for("magnitude", w), PruneSpec("magnitude", 0.5), per_row=False)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_keeps_exactly_n_per_group(pattern, n, m):
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    keep = mask_from_scores(scores, PruneSpec("wanda", pattern=pattern), per_row=True)
    groups = keep.reshape(6, 16 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the group's largest
    kept_min = torch.where(groups, scores.reshape(6, -1, m), torch.inf).min(-1).values
    pruned_max = torch.where(~groups, scores.reshape(6, -1, m), -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_bad_patterns_and_sparsities_are_refused():
    with pytest.raises(ValueError, match=r"pattern='3:2'.*allowed 'unstructured' or 'N:M'"):
        PruneSpec("wanda", pattern="3:2")
    with pytest.raises(ValueError, match=r"sparsity=1.0: must be in \[0, 1\)"):
        PruneSpec("wanda", 1.0)
    with pytest.raises(ValueError, match=r"method='obs': allowed \['magnitude', 'wanda', 'random'\]"):
        PruneSpec("obs")
    with pytest.raises(ValueError, match="divisible by 8"):
        mask_from_scores(torch.rand(2, 12), PruneSpec("wanda", pattern="4:8"), per_row=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(family, sparsity):
    for method in ("wanda", "random", "magnitude"):
        model = tiny(family)
        masks, _ = prune(model, PruneSpec(method, sparsity), calibration(model))
        for name, keep in masks.items():
            if method == "magnitude":  # per layer
                assert int((~keep).sum()) == int(sparsity * keep.numel()), name
            else:  # per output row
                assert ((~keep).sum(1) == int(sparsity * keep.shape[1])).all(), name
        # the model's weights are zero exactly where the mask prunes
        params = dict(model.named_parameters())
        for name, keep in masks.items():
            assert (params[name][~keep] == 0).all() and (params[name][keep] != 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_block_by_block_matches_a_full_forward_with_earlier_blocks_pruned(family):
    """Block i's statistics come from the model with blocks < i already pruned, over real tokens only.

    The reference runs each calibration sequence alone (no padding) through the plain Hugging
    Face model with the earlier blocks' masks applied, and records the linear layers' inputs
    with its own hooks.
    """
    model = tiny(family)
    reference = copy.deepcopy(model)
    batches = calibration(model)
    masks, norms = prune(model, PruneSpec("wanda", 0.5), batches)
    blocks = prunable_linears(reference)
    for i, block in enumerate(blocks):
        earlier = {n: masks[n] for b in blocks[:i] for n in b}
        ref = apply_masks(copy.deepcopy(reference), earlier)
        ref_block = prunable_linears(ref)[i]
        sq = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in ref_block.items()}

        def record(name):
            def hook(module, inputs, output):
                sq[name].add_(inputs[0].reshape(-1, module.in_features).double().pow(2).sum(0))
            return hook

        handles = [lin.register_forward_hook(record(n)) for n, lin in ref_block.items()]
        with torch.no_grad():
            for embeds, mask in batches:
                for row in range(embeds.shape[0]):
                    length = int(mask[row].sum())
                    ref(inputs_embeds=embeds[row : row + 1, :length], attention_mask=mask[row : row + 1, :length])
        for h in handles:
            h.remove()
        for name, lin in ref_block.items():
            torch.testing.assert_close(norms[name], sq[name].sqrt().float(), rtol=1e-4, atol=1e-5)
            expected = mask_from_scores(lin.weight.abs() * sq[name].sqrt().float()[None], PruneSpec("wanda", 0.5),
                                        per_row=True)
            assert torch.equal(masks[name], expected), name
    # hooks are gone: plain use of the model is unaffected
    for layer_linears in prunable_linears(model):
        for lin in layer_linears.values():
            assert not lin._forward_hooks and not lin._forward_pre_hooks
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_pruning_is_deterministic_and_random_depends_on_seed():
    a, _ = prune(tiny("opt"), PruneSpec("wanda", 0.5), calibration(tiny("opt")))
    b, _ = prune(tiny("opt"), PruneSpec("wanda", 0.5), calibration(tiny("opt")))
    assert all(torch.equal(a[n], b[n]) for n in a)
    r1, _ = prune(tiny("opt"), PruneSpec("random", 0.5), seed=1)
    r2, _ = prune(tiny("opt"), PruneSpec("random", 0.5), seed=1)
    r3, _ = prune(tiny("opt"), PruneSpec("random", 0.5), seed=2)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
    assert not all(torch.equal(r1[n], r3[n]) for n in r1)


def test_mask_round_trips_through_safetensors_and_applies_to_a_fresh_copy(tmp_path):
    pruned = tiny("llama")
    masks, _ = prune(pruned, PruneSpec("wanda", pattern="2:4"), calibration(pruned))
    path = tmp_path / "mask.safetensors"
    save_masks(path, masks, {"method": "wanda", "pattern": "2:4", "task": "vqa", "sparsity": "0.5"})
    assert mask_metadata(path) == {"method": "wanda", "pattern": "2:4", "task": "vqa", "sparsity": "0.5"}
    again = tmp_path / "again.safetensors"
    for _ in range(3):  # the same masks give the same bytes (safetensors orders metadata by hash)
        save_masks(again, dict(reversed(list(masks.items()))), {"task": "vqa", "sparsity": "0.5", "method": "wanda",
                                                                "pattern": "2:4"})
        assert again.read_bytes() == path.read_bytes()
    loaded = load_masks(path)
    assert sorted(loaded) == sorted(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    fresh = apply_masks(tiny("llama"), loaded)
    for (n1, p1), (n2, p2) in zip(pruned.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert mask_sparsity(loaded)["overall"] == pytest.approx(0.5)


def test_apply_masks_names_the_bad_entry():
    model = tiny("opt")
    with pytest.raises(ValueError, match=r"'model.decoder.layers.9.fc1.weight' is not a parameter"):
        apply_masks(model, {"model.decoder.layers.9.fc1.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'model.decoder.layers.0.fc1.weight' has shape \(2, 2\)"):
        apply_masks(model, {"model.decoder.layers.0.fc1.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_subnet_rules_on_small_masks():
    t = torch.tensor
    a = {"w": t([[True, True, False, False]])}
    b = {"w": t([[True, False, True, False]])}
    c = {"w": t([[True, False, False, True]])}
    assert combine([a, b, c], "intersection")["w"].tolist() == [[True, False, False, False]]
    assert combine([a, b, c], "union")["w"].tolist() == [[True, True, True, True]]
    assert combine([a, b], "union")["w"].tolist() == [[True, True, True, False]]
    assert combine([a, b, c], "majority")["w"].tolist() == [[True, False, False, False]]
    assert combine([a, b], "majority")["w"].tolist() == [[True, False, False, False]]
    # at a target sparsity: candidates first, then by mean normalised score
    sa = {"w": t([[4.0, 3.0, 2.0, 1.0]])}  # / mean 2.5 -> 1.6 1.2 0.8 0.4
    sb = {"w": t([[1.0, 1.0, 1.0, 5.0]])}  # / mean 2.0 -> 0.5 0.5 0.5 2.5; mean of both: 1.05 0.85 0.65 1.45
    # intersection {0}: too few, so the best of the rest (3) fills; union {0, 1, 2}: the best two
    assert combine([a, b], "intersection", 0.5, [sa, sb])["w"].tolist() == [[True, False, False, True]]
    assert combine([a, b], "union", 0.5, [sa, sb])["w"].tolist() == [[True, True, False, False]]
    assert combine([a, b], "union", 0.75, [sa, sb])["w"].tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match=r"rule='xor': allowed \['intersection', 'union', 'majority'\]"):
        combine([a, b], "xor")
    with pytest.raises(ValueError, match="at least 2 task masks"):
        combine([a], "union")


def test_iou():
    t = torch.tensor
    assert iou(t([True, True, False]), t([True, False, True])) == pytest.approx(1 / 3)
    assert iou(t([False, False]), t([False, False])) == 1.0
    per = iou_per_block({"x": t([True, True]), "y": t([True])}, {"x": t([True, False]), "y": t([True])}, [["x", "y"]])
    assert per == [pytest.approx(2 / 3)]


def test_bench_prune_writes_time_memory_and_bars_for_both_cases(tmp_path):
    from mmskip.compression.bench import PruneBenchConfig, bench_prune

    llm = tmp_path / "llm"
    model = tiny("opt")
    model.save_pretrained(llm)
    width = {"default_llm": model.config.hidden_size, "opt125m_random": 16}
    cfg = PruneBenchConfig(num_sequences=6, sequence_length=8, batch_size=4, sparsity=0.5, hidden_size=16,
                           num_layers=2, num_heads=2, ffn_dim=32, vocab_size=64)
    out = tmp_path / "bench" / "prune.json"
    report = bench_prune(cfg, seed=0, out=out, llm=llm, threads=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [c["case"] for c in report["cases"]] == ["default_llm", "opt125m_random"]
    for case in report["cases"]:
        assert case["achieved_sparsity"] == pytest.approx(0.5)
        assert case["tokens"] == 6 * 8 and case["seconds"] > 0
        assert case["peak_rss_during_prune_mb"] >= case["rss_after_load_mb"] > 0
        assert case["process_peak_rss_mb"] >= case["peak_rss_during_prune_mb"]
        assert case["peak_growth_mb"] == pytest.approx(case["peak_rss_during_prune_mb"] - case["rss_before_model_mb"])
        assert case["peak_growth_over_weights"] == pytest.approx(case["peak_growth_mb"] / case["weight_mb"])
        assert case["activation_mb"] == pytest.approx(6 * 8 * width[case["case"]] * 4 / 2**20)  # one float32 set
        assert case["bar_applies"] == (case["activation_mb"] < case["weight_mb"] / 2)
    bars = {k: v for k, v in report["bars"].items() if k != "all_met"}
    assert set(bars) == {f"{c['case']}_peak_below_2x_weights" for c in report["cases"] if c["bar_applies"]}
    assert report["bars"]["all_met"] == all(bars.values())
    assert not list(out.parent.glob(".*")), "no temporary file left behind"


def test_bench_prune_config_names_the_bad_value():
    from mmskip.compression.bench import PruneBenchConfig

    with pytest.raises(ValueError, match=r"sparsity=1.5: must be in \(0, 1\)"):
        PruneBenchConfig(sparsity=1.5)
    with pytest.raises(ValueError, match=r"num_layers=0: must be >= 1"):
        PruneBenchConfig(num_layers=0)


def test_a_mask_set_is_named_by_its_own_index(tmp_path):
    """`evaluate_compressed --masks models/masks/{name}`: the set's index names its method; a folder
    holding neither index or both, or an index of an unknown method, is refused before any decode."""
    from mmskip.compression.run import mask_set_index

    (tmp_path / "wanda").mkdir()
    (tmp_path / "wanda/prune.json").write_text(json.dumps({"method": "wanda", "entries": []}))
    (tmp_path / "subnet").mkdir()
    (tmp_path / "subnet/subnet.json").write_text(json.dumps({"method": "subnet", "entries": []}))
    assert mask_set_index(tmp_path / "wanda")["method"] == "wanda"
    assert mask_set_index(tmp_path / "subnet")["method"] == "subnet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"exactly one of prune.json .* or subnet.json .*; found neither"):
        mask_set_index(tmp_path / "empty")
    (tmp_path / "subnet/prune.json").write_text(json.dumps({"method": "wanda", "entries": []}))
    with pytest.raises(ValueError, match=r"found \['prune.json', 'subnet.json'\]"):
        mask_set_index(tmp_path / "subnet")
    (tmp_path / "wanda/prune.json").write_text(json.dumps({"method": "sparsegpt", "entries": []}))
    with pytest.raises(ValueError, match=r"method='sparsegpt': allowed \['magnitude', 'wanda', 'random', 'subnet'\]"):
        mask_set_index(tmp_path / "wanda")


def test_evaluate_compressed_refuses_a_set_whose_index_names_another_before_loading_anything(tmp_path):
    """One job evaluates every set of compression.mask_sets under models/masks: a folder whose index names another
    method is refused, naming both, before the LLM is read (here there is none)."""
    from mmskip.compression.run import evaluate_compressed
    from mmskip.params import CompressionConfig

    for name, method in (("magnitude", "magnitude"), ("random", "magnitude")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prune.json").write_text(json.dumps({"method": method, "entries": []}))
    missing = tmp_path / "nothing"
    with pytest.raises(ValueError, match=r"random: holds the masks of 'magnitude', not of 'random'"):
        evaluate_compressed("vqa", tmp_path, missing, missing, missing, missing, missing, missing, None,
                            CompressionConfig(mask_sets=("magnitude", "random")), None)
