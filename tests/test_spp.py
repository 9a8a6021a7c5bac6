"""SPP on a tiny ViT trained here on scikit-learn's handwritten digits (a real data set shipped offline):
the Trainer search, nested read-offs in every budget unit, physically smaller models equal to the masked ones,
save -> reload of the path and of the smaller model, checkpoint resume, two processes, and the knobs' errors."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers as T

pytest.importorskip("sklearn")

from spp_digits import Digits, accuracy, digits, tiny_vit, train  # noqa: E402

from hf_prune import Pruner, PrunerConfig, SolutionPath, SPPConfig  # noqa: E402
from hf_prune.callbacks import SolutionPathCallback  # noqa: E402
from hf_prune.methods.spp import SPPMasks, attach_masks, save_model  # noqa: E402
from hf_prune.methods.spp.ops import priority  # noqa: E402
from hf_prune.structured import needs_variable_layout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    model = train(tiny_vit(0), x, y)
    assert accuracy(model, x, y) > 0.75  # a real classifier: chance is 0.10
    return model


def _search(model, data, out_dir, config, steps=120, **overrides):
    x, y = data
    attach_masks(model, config)
    args = config.training_arguments(str(out_dir), max_steps=steps, per_device_train_batch_size=64, seed=0,
                                     use_cpu=True, disable_tqdm=True, logging_strategy="no",
                                     **{"save_strategy": "no", **overrides})
    callback = SolutionPathCallback()
    trainer = T.Trainer(model=model, args=args, train_dataset=Digits(*data), callbacks=[callback])
    return trainer, callback


@pytest.fixture(scope="module")
def searched(trained, data, tmp_path_factory):
    """One released-code search with per-head masks: (model without masks, its path, the search folder)."""
    model = copy.deepcopy(trained)
    out = tmp_path_factory.mktemp("spp-search")
    trainer, callback = _search(model, data, out, SPPConfig(lr=1e-2, lam=0.5, record_every=5,
                                                            coupling="released", share_across_heads=False))
    trainer.train()
    SPPMasks.find(model).remove(model)
    return model, callback.path, out


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


# ----------------------------------------------------------------------------------------------------------


def test_masks_start_neutral_freeze_the_backbone_and_come_off(trained, data):
    x, _ = data
    model = copy.deepcopy(trained)
    before = _logits(model, x[:64])
    masks = attach_masks(model, SPPConfig())
    assert [u.name for u in masks.specs][:3] == ["vit.layers.0.qk", "vit.layers.0.vo", "vit.layers.0.mlp"]
    assert [u.shape for u in masks.specs][:3] == [[8], [8], [64]]  # shared across heads by default
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("hf_prune_spp.") and n.endswith(".alpha") for n in trainable)
    torch.testing.assert_close(_logits(model, x[:64]), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already carries SPP masks"):
        attach_masks(model, SPPConfig())
    masks.remove(model)
    assert not hasattr(model, "hf_prune_spp") and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model, x[:64]), before, rtol=0, atol=0)


def test_search_records_first_entry_times_on_the_learning_rate_clock(searched):
    _, path, out = searched
    assert path.kind == "structured" and path.search["steps"] == 120 and path.search["records"] == 24
    assert os.path.isfile(out / "solution_path" / "solution_path.json")  # written by the (only) main process
    first = torch.cat([path.tensors[f"{i}.first_entry"].flatten() for i in range(len(path.units))])
    entered = first[torch.isfinite(first)]
    assert entered.numel() > first.numel() // 2
    # path time is the cumulative learning rate: every entry time is one of the step times, at most the total
    assert float(entered.max()) <= path.search["time"] + 1e-9 and float(entered.min()) > 0
    counts = torch.cat([path.tensors[f"{i}.on_count"].flatten() for i in range(len(path.units))])
    assert int(counts.max()) <= 24 and bool(((counts > 0) <= torch.isfinite(first)).all())
    assert [u["shape"] for u in path.units[:3]] == [[4, 8], [4, 8], [64]]  # per-head masks


def test_split_lbi_search_keeps_what_the_classifier_knows(trained, data, tmp_path):
    """The default coupling (Split LBI) finds the structures the digits classifier needs: 60 search steps, then
    read-offs far better than a random ranking of the same structures."""
    x, y = data
    model = copy.deepcopy(trained)
    trainer, callback = _search(model, data, tmp_path, SPPConfig(lr=1e-2, share_across_heads=False), steps=60)
    trainer.train()
    SPPMasks.find(model).remove(model)
    path = callback.path
    g = torch.Generator().manual_seed(0)
    shuffled = {k: torch.rand(v.shape, generator=g) if k.endswith(".z") else
                torch.full(v.shape, float("inf")) if k.endswith(".first_entry") else v for k, v in path.tensors.items()}
    random = SolutionPath(path.kind, path.units, shuffled, path.config, path.model, path.search)
    dense = accuracy(trained, x, y)
    assert accuracy(path.materialize(trained, 0.3), x, y) >= 0.95 * dense
    assert accuracy(path.materialize(trained, 0.5), x, y) >= accuracy(random.materialize(trained, 0.5), x, y) + 0.05


@pytest.mark.parametrize("budget", ["params", "flops", "entries"])
@pytest.mark.parametrize("scope", ["per_group", "global"])
def test_read_offs_are_nested_and_meet_the_budget(searched, budget, scope):
    _, path, _ = searched
    previous = None
    for s in SPARSITIES:
        keep = path.masks_at(s, budget=budget, scope=scope)
        flat = torch.cat([keep[n].flatten() for n in path.names])
        if previous is not None:
            assert bool((flat <= previous).all()), f"not nested at {s}"
        previous = flat
        report = path.read_off(s, budget=budget, scope=scope)
        groups = report["per_group"].values() if scope == "per_group" else [None]
        for unit_kind, group in zip(report["per_group"], groups):
            if group is None:
                total = sum(g[f"{budget}_total"] for g in report["per_group"].values())
                removed = sum(g[f"{budget}_removed"] for g in report["per_group"].values())
                step = max(u["cost"][budget] for u in path.units)
            else:
                total, removed = group[f"{budget}_total"], group[f"{budget}_removed"]
                step = max(u["cost"][budget] for u in path.units if u["kind"] == unit_kind)
            assert abs(removed - s * total) <= step / 2 + 1e-6, (unit_kind, s, removed / total)
        for unit in path.units:  # min_keep=1: no block loses a whole group
            assert bool(keep[unit["name"]].any())


def test_iss_updates_and_records_by_hand():
    from hf_prune.methods.spp import ops

    assert ops.adam_step_size(0.01, 1, 0.9, True) == pytest.approx(0.1)
    assert ops.adam_step_size(0.01, 2, 0.9, True) == pytest.approx(0.01 / 0.19)
    assert ops.adam_step_size(0.01, 1, 0.9, False) == 0.01
    alpha, z, gamma = torch.tensor([1.0, 0.5, -1.0]), torch.tensor([2.9, 0.0, 0.0]), torch.zeros(3)
    z1, g1 = ops.released_update(z, gamma, alpha, eta=0.2, kappa=1.0, lam=3.0)
    torch.testing.assert_close(z1, torch.tensor([3.1, 0.1, -0.2]))
    torch.testing.assert_close(g1, torch.tensor([0.1, 0.0, 0.0]))  # non-negative shrinkage
    z2, g2 = ops.split_lbi_update(z1, g1, alpha, eta=0.2, kappa=2.0, lam=3.0, nu=10.0)
    torch.testing.assert_close(z2, z1 + 0.02 * (alpha - g1))
    torch.testing.assert_close(g2, 2.0 * (z2 - 3.0).clamp_min(0))
    torch.testing.assert_close(ops.coupling_gradient(alpha, g1, 10.0), (alpha - g1) / 10)
    first, last = torch.full((3,), float("inf")), torch.full((3,), float("inf"))
    on = ops.record_entries(torch.tensor([0.1, 0.0, 0.2]), torch.tensor([False, True, False]), first, last, 0.5)
    assert on.tolist() == [True, False, True] and first.tolist() == [0.5, float("inf"), 0.5]
    assert last.tolist() == [float("inf"), 0.5, float("inf")]
    ops.record_entries(torch.tensor([0.3, 0.1, 0.0]), on, first, last, 0.75)  # first entry never moves
    assert first.tolist() == [0.5, 0.75, 0.5] and last.tolist() == [float("inf"), 0.5, 0.75]
    costs = torch.tensor([1.0, 1.0, 4.0, 1.0])  # least important first; closest total, ties remove more
    assert [ops.removal_count(costs, t) for t in (0.0, 0.4, 0.6, 1.4, 2.6, 4.0, 7.0)] == [0, 0, 1, 1, 2, 3, 4]


def test_priority_is_a_total_order_with_documented_ties():
    first = torch.tensor([0.3, float("inf"), 0.1, 0.3, float("inf")])
    z = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.7])
    counts = torch.tensor([5, 0, 9, 5, 0])
    assert priority(first, z, counts, "first_entry").tolist() == [2, 3, 0, 4, 1]
    assert priority(first, z, counts, "on_count").tolist() == [2, 3, 0, 4, 1]
    counts = torch.tensor([7, 0, 1, 5, 0])
    assert priority(first, z, counts, "on_count").tolist() == [0, 3, 2, 4, 1]


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_materialized_model_is_smaller_and_equals_the_masked_model(searched, data, sparsity):
    model, path, _ = searched
    x, y = data
    masked = path.apply(model, sparsity)
    small = path.materialize(model, sparsity)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(small, x[1400:]), _logits(masked, x[1400:]), rtol=1e-5, atol=1e-5)
    # the carrier with 0/1 masks computes the masked model too (hooks == zeroed weights)
    hooked = copy.deepcopy(model)
    attach_masks(hooked, SPPConfig.from_dict(path.config)).set_masks(path.masks_at(sparsity))
    torch.testing.assert_close(_logits(hooked, x[1400:]), _logits(masked, x[1400:]), rtol=1e-6, atol=1e-6)
    assert accuracy(path.materialize(model, 0.1), x, y) > 0.5
    # reading off never touches the caller's model
    torch.testing.assert_close(_logits(model, x[:32]), _logits(copy.deepcopy(model), x[:32]))
    assert model.vit.layers[0].attention.q_proj.out_features == 32


def test_path_and_materialized_model_save_and_reload(searched, data, tmp_path):
    model, path, _ = searched
    x, _ = data
    path.save_pretrained(tmp_path / "path")
    again = SolutionPath.from_pretrained(tmp_path / "path")
    assert again.units == path.units and again.config == path.config and again.search == path.search
    assert all(torch.equal(again.tensors[k], path.tensors[k]) for k in path.tensors)
    assert all(torch.equal(again.masks_at(0.5)[n], path.masks_at(0.5)[n]) for n in path.names)
    seen = set()
    for s in SPARSITIES:  # uniform widths reload with the stock class, per-block widths through the layout
        small = again.materialize(model, s)
        uniform = not needs_variable_layout(small)
        if uniform in seen:
            continue
        seen.add(uniform)
        folder = save_model(small, tmp_path / f"small-{s}")
        config = json.load(open(os.path.join(folder, "config.json")))
        if uniform:
            assert "auto_map" not in config and config["model_type"] == "vit"
            loaded = T.ViTForImageClassification.from_pretrained(folder)
        else:
            assert config["auto_map"]["AutoModelForImageClassification"].startswith("hf_prune_layout.")
            loaded = T.AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
        torch.testing.assert_close(_logits(loaded, x[1400:]), _logits(small, x[1400:]), rtol=0, atol=0)
    assert seen == {True, False}
    with pytest.raises(FileNotFoundError, match="solution_path.json"):
        SolutionPath.from_pretrained(tmp_path / "small-0.1")


def test_pruner_reads_a_saved_path_and_reports_what_was_removed(searched, data, tmp_path):
    model, path, _ = searched
    x, _ = data
    path.save_pretrained(tmp_path / "path")
    pruner = Pruner(copy.deepcopy(model))
    result = pruner.prune(SPPConfig(path=str(tmp_path / "path"), sparsity=0.4))
    read = result.report["read_off"]
    assert read["sparsity"] == 0.4 and read["budget"] == "params" and set(read["per_group"]) == {"qk", "vo", "mlp"}
    assert read["achieved"]["params"] == pytest.approx(0.4, abs=0.02)
    assert result.path.search == path.search
    torch.testing.assert_close(_logits(pruner.model, x[1400:]), _logits(path.apply(model, 0.4), x[1400:]),
                               rtol=1e-5, atol=1e-5)
    folder = pruner.save_pretrained(tmp_path / "out")
    assert isinstance(PrunerConfig.from_pretrained(folder), SPPConfig)
    report = json.load(open(os.path.join(folder, "pruning_report.json")))
    assert report["parameters"]["after"] < report["parameters"]["before"]
    card = open(os.path.join(folder, "README.md")).read()
    assert "physically removed" in card and "## What was removed" in card
    # the read-off card links its path and the search, formatted; no local path, no "data-free" claim
    assert "Read off a solution path (`path`)" in card and "data-free" not in card
    assert f"steps {path.search['steps']}" in card and f"time {path.search['time']:.4g}" in card
    assert str(tmp_path) not in card and "(the read-off only)" in card
    assert f"All parameters: {report['parameters']['before']:,} → {report['parameters']['after']:,}" in card
    loaded = T.AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    torch.testing.assert_close(_logits(loaded, x[1400:]), _logits(pruner.model, x[1400:]), rtol=0, atol=0)


def test_trainer_resume_reproduces_the_path(trained, data, tmp_path):
    config = SPPConfig(lr=1e-2, lam=0.2, record_every=3, coupling="split_lbi", nu=1.0)
    trainer, full = _search(copy.deepcopy(trained), data, tmp_path / "a", config, steps=24)
    trainer.train()

    class Stop(T.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 12

    trainer, _ = _search(copy.deepcopy(trained), data, tmp_path / "b", config, steps=24, save_strategy="steps",
                         save_steps=12)
    trainer.add_callback(Stop())
    trainer.train()
    trainer, resumed = _search(copy.deepcopy(trained), data, tmp_path / "b", config, steps=24,
                               save_strategy="steps", save_steps=12)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-12"))
    assert resumed.path.search == full.path.search and full.path.search["records"] == 8
    for key, tensor in full.path.tensors.items():
        assert torch.equal(resumed.path.tensors[key], tensor), key
    assert sum(int(torch.isfinite(full.path.tensors[f"{i}.first_entry"]).sum()) for i in range(6)) > 0


def test_two_processes_record_the_same_path(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "spp_distributed_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    paths = [load_file(tmp_path / f"path_rank{r}.safetensors") for r in (0, 1)]
    infos = [json.load(open(tmp_path / f"info_rank{r}.json")) for r in (0, 1)]
    assert infos[0]["world_size"] == infos[1]["world_size"] == 2
    assert infos[0]["search"] == infos[1]["search"]
    assert paths[0].keys() == paths[1].keys() and all(torch.equal(paths[0][k], paths[1][k]) for k in paths[0])
    assert sum(int(torch.isfinite(v).sum()) for k, v in paths[0].items() if k.endswith("first_entry")) > 0
    assert os.path.isfile(tmp_path / "saved_by_rank0") and not os.path.exists(tmp_path / "saved_by_rank1")
    assert os.path.isfile(tmp_path / "run" / "solution_path" / "solution_path.safetensors")


def test_push_to_hub_uploads_the_path_with_its_card(searched, fake_hub):
    _, path, _ = searched
    info = path.push_to_hub("me/vit-digits-spp-path", private=True, token="t")
    repo = fake_hub.repos["me/vit-digits-spp-path"]
    assert repo.private is True and info.oid == repo.heads["main"]
    assert set(repo.files) == {"solution_path.json", "solution_path.safetensors", "solution_path.png", "README.md"}
    meta, body = fake_hub.card("me/vit-digits-spp-path")
    assert meta["library_name"] == "hf_prune" and {"spp", "solution-path", "structured-pruning"} <= set(meta["tags"])
    assert 'SolutionPath.from_pretrained("me/vit-digits-spp-path")' in body and "![Density along the path]" in body
    achieved = path.read_off(0.4)["achieved"]
    assert f"| 0.4 | {achieved['params']:.4f} | {achieved['flops']:.4f} | {achieved['entries']:.4f} |" in body
    assert json.loads(re.search(r"```json\n(.*?)```", body, flags=re.S).group(1)) == path.config
    again = SolutionPath.from_pretrained("me/vit-digits-spp-path")  # read back from the Hub
    assert again.kind == path.kind and again.names == path.names
    assert all(torch.equal(again.tensors[k], path.tensors[k]) for k in path.tensors)
    path.push_to_hub("me/vit-digits-spp-path", path_in_repo="runs/1")
    assert {"runs/1/solution_path.json", "runs/1/README.md"} <= set(repo.files)


def test_path_from_a_hub_revision_with_a_token(searched, fake_hub):
    _, path, _ = searched
    path.push_to_hub("me/spp-path", revision="v2", token="hf_writer")
    assert "solution_path.json" not in fake_hub.repos["me/spp-path"].files  # only on the branch
    start = len(fake_hub.requests)
    again = SolutionPath.from_pretrained("me/spp-path", revision="v2", token="hf_reader")
    assert again.names == path.names and all(torch.equal(again.tensors[k], path.tensors[k]) for k in path.tensors)
    sent = [r for r in fake_hub.requests[start:] if "/resolve/" in r.path]
    assert len(sent) >= 2 and all("/resolve/v2/" in r.path and r.headers.get("authorization") == "Bearer hf_reader"
                                  for r in sent)


def test_a_path_where_nothing_entered_warns_at_the_end_of_the_search_and_at_read_off(trained, data, tmp_path):
    model = copy.deepcopy(trained)
    trainer, callback = _search(model, data, tmp_path / "short", SPPConfig(lr=1e-6, lam=0.5, record_every=1,
                                                                           coupling="released"), steps=1)
    with pytest.warns(UserWarning, match="SPP search ended: no entry of this solution path has entered yet after 1 "
                                         "steps"):
        trainer.train()
    SPPMasks.find(model).remove(model)
    path = callback.path
    assert path.entered() == 0
    with pytest.warns(UserWarning, match="no entry of this solution path has entered yet.*Search longer"):
        path.read_off(0.3)
    card = (tmp_path / "short" / "solution_path" / "README.md").read_text()  # saved by the callback
    assert "**Warning:** no entry of this solution path has entered yet" in card
    assert f"| time | `{path.search['time']:.4g}` |" in card  # numbers formatted, not 0.15514499999999998
    assert SolutionPath("unstructured", [], {}, {}).entered() is None


def test_plot_writes_a_png(searched, tmp_path):
    _, path, _ = searched
    out = path.plot(tmp_path / "path.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    curves = path.density_curves()
    assert set(curves) == {"qk", "vo", "mlp"}
    for times, density in curves.values():
        assert bool((times[1:] >= times[:-1]).all()) and bool((density[1:] > density[:-1]).all())


def test_bad_inputs_fail_clearly_before_anything_changes(searched, trained, data, tmp_path):
    model, path, _ = searched
    with pytest.raises(ValueError, match="SPPConfig.coupling='lbi' is not supported"):
        SPPConfig(coupling="lbi")
    with pytest.raises(ValueError, match=r"SPPConfig.lam=0 must be a number in \(0"):
        SPPConfig(lam=0)
    with pytest.raises(ValueError, match="groups"):
        SPPConfig(groups=("qk", "attn"))
    with pytest.raises(ValueError, match="record_every"):
        SPPConfig(record_every=0)
    with pytest.raises(ValueError, match="learning_rate=0.5 differs from SPPConfig.lr"):
        SPPConfig().training_arguments(str(tmp_path), learning_rate=0.5)
    assert SPPConfig.from_dict(SPPConfig(groups=["mlp", "qk"]).to_dict()).groups == ("qk", "mlp")
    with pytest.raises(ValueError, match=r"sparsity=1.0 must be a number in \[0, 1\)"):
        path.masks_at(1.0)
    with pytest.raises(ValueError, match="budget='bytes'"):
        path.masks_at(0.5, budget="bytes")
    other = T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, num_labels=10))
    with pytest.raises(ValueError, match="does not fit this solution path"):
        path.materialize(other, 0.5, inplace=True)
    assert other.vit.layers[0].mlp.fc1.out_features == 64
    carrying = copy.deepcopy(model)
    attach_masks(carrying, SPPConfig())
    with pytest.raises(ValueError, match="still carries SPP masks"):
        path.materialize(carrying, 0.5)
    # the callback refuses a Trainer that would not run the search it records
    plain = copy.deepcopy(trained)
    trainer = T.Trainer(model=plain, args=SPPConfig().training_arguments(str(tmp_path / "x"), max_steps=1,
                                                                       use_cpu=True),
                        train_dataset=Digits(*data, 64), callbacks=[SolutionPathCallback()])
    with pytest.raises(ValueError, match="carries no SPP masks"):
        trainer.train()
    masked = copy.deepcopy(trained)
    attach_masks(masked, SPPConfig())
    args = T.TrainingArguments(str(tmp_path / "y"), learning_rate=0.01, max_steps=1, use_cpu=True, report_to="none")
    trainer = T.Trainer(model=masked, args=args, train_dataset=Digits(*data, 64), callbacks=[SolutionPathCallback()])
    with pytest.raises(ValueError, match="learning_rate=0.01 differs from SPPConfig.lr=0.001"):
        trainer.train()
