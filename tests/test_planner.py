"""The planner on real model shapes (local config files; the model is built on the meta device)."""

from __future__ import annotations

import json
import os

import pytest

from hf_prune.cli import main
from hf_prune.planner import plan

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "configs")


def _cfg(name):
    return os.path.join(CONFIGS, f"{name}.json")


@pytest.mark.parametrize("name,params", [("llama-2-7b", 6_738_415_616), ("llama-2-70b", 68_976_648_192),
                                         ("blip2-opt-2.7b", 3_744_679_936)])
def test_parameter_counts_of_real_shapes(name, params):
    assert plan(_cfg(name), "magnitude", throughput=1e12).parameters == params


def test_sparsegpt_statistics_and_solve_memory_match_the_arithmetic():
    p = plan(_cfg("llama-2-7b"), "sparsegpt", throughput=1e12, num_samples=128, seq_len=2048)
    stage = p.stages[0]
    # one Gram per distinct input: q/k/v share one (4096), o has its own (4096), gate/up share one (4096), down 11008
    assert stage.stats_bytes == 4 * (3 * 4096 ** 2 + 11008 ** 2)
    assert stage.solve_bytes == 4 * (4096 * 11008 + 3 * 11008 ** 2)  # the widest solve: down_proj
    assert stage.hidden == 4096 and stage.activation_cache == 2 * 128 * 2048 * 4096 * 2  # in + out, float16
    assert p.dtype == "float16" and p.weight_bytes == 2 * p.parameters


def test_llama_70b_fits_one_24gb_gpu_with_cpu_offload():
    cpu = plan(_cfg("llama-2-70b"), "sparsegpt", offload="cpu", throughput=1e14)
    disk = plan(_cfg("llama-2-70b"), "sparsegpt", offload="disk", throughput=1e14)
    assert cpu.device_peak < 24e9 and cpu.fits(24e9)
    assert cpu.host_peak > cpu.weight_bytes > disk.host_peak  # disk offload keeps one block in RAM
    budget = plan(_cfg("llama-2-70b"), "sparsegpt", offload="disk", throughput=1e14, max_memory=20 * 2**30)
    assert budget.host_peak == disk.host_peak + 20 * 2**30  # plus what accelerate may keep in RAM
    with pytest.raises(ValueError, match="max_memory=.* only applies to offload='disk'"):
        plan(_cfg("llama-2-70b"), "sparsegpt", offload="cpu", throughput=1e14, max_memory=2**30)
    assert disk.disk == 2 * disk.weight_bytes and cpu.disk == cpu.weight_bytes
    assert cpu.seconds == pytest.approx(cpu.flops / 1e14)
    wanda = plan(_cfg("llama-2-70b"), "wanda", offload="cpu", throughput=1e14)
    assert wanda.device_peak < cpu.device_peak and wanda.flops < cpu.flops


def test_blip2_has_three_stages_with_their_own_token_counts():
    p = plan(_cfg("blip2-opt-2.7b"), "wanda", seq_len=64, throughput=1e12)
    assert [s.name for s in p.stages] == ["vision", "qformer", "language"]
    assert [s.tokens_per_sample for s in p.stages] == [(224 // 14) ** 2 + 1, 32, 64]
    assert [s.blocks for s in p.stages] == [39, 12, 32]


def test_cli_plan(capsys):
    assert main(["plan", _cfg("llama-2-70b"), "--method", "sparsegpt", "--offload", "cpu", "--device-memory", "24GB",
                 "--throughput", "1e14"]) == 0
    out = capsys.readouterr().out
    assert "fits in 22.4 GiB" in out and "expected peak on the execution device" in out
    assert main(["plan", _cfg("llama-2-7b"), "--json", "--throughput", "1e12"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 6_738_415_616
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", _cfg("llama-2-7b"), "--offload", "tape"])
    assert exit_info.value.code == 2
    assert main(["plan", _cfg("llama-2-7b"), "--dtype", "int3", "--throughput", "1"]) == 2
    assert "dtype='int3' is not supported" in capsys.readouterr().err


def test_measured_throughput_is_positive():
    p = plan(_cfg("llama-2-7b"), "wanda", num_samples=2, seq_len=16)
    assert p.throughput > 1e8 and p.seconds > 0 and "measured" in p.throughput_source


def test_num_processes_plans_memory_per_process_and_time():
    one = plan(_cfg("llama-2-7b"), "sparsegpt", throughput=1e14, num_samples=128, seq_len=2048, batch_size=8)
    assert one.num_processes == 1 and one.batches_per_process == 16 and one.allreduce_bytes == 0
    assert one.process_host_peak == one.node_host_peak == one.host_peak and one.seconds == one.single_process_seconds
    four = plan(_cfg("llama-2-7b"), "sparsegpt", throughput=1e14, num_samples=128, seq_len=2048, batch_size=8,
                num_processes=4, bandwidth=1e10)
    stage = four.stages[0]
    assert four.batches_per_process == 4
    assert four.process_device_peak == one.device_peak  # every process: the block, the full statistics, one batch
    # the same runtime, weights and block working set, and its share of the cached activations
    assert four.process_host_peak == one.host_peak - stage.activation_cache + stage.activation_cache // 4
    assert four.node_host_peak == 4 * four.process_host_peak
    assert four.allreduce_bytes == int(32 * stage.stats_bytes * 2 * 3 / 4)  # ring all-reduce of every block's Gram
    passes, solves = stage.flops - stage.solve_flops, stage.solve_flops
    assert solves > 0 and four.seconds == pytest.approx((passes / 4 + solves) / 1e14 + four.allreduce_bytes / 1e10)
    assert four.seconds < one.seconds == four.single_process_seconds
    with pytest.raises(ValueError, match="make 1 batches, fewer than num_processes=2"):
        plan(_cfg("llama-2-7b"), "wanda", throughput=1e12, num_samples=8, batch_size=8, num_processes=2)
    with pytest.raises(ValueError, match="num_processes=0 must be a whole number >= 1"):
        plan(_cfg("llama-2-7b"), "wanda", throughput=1e12, num_processes=0)


def test_cli_plan_num_processes(capsys):
    assert main(["plan", _cfg("llama-2-7b"), "--method", "wanda", "--throughput", "1e13", "--num-processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "estimated time with one process:" in out and "with 2 processes (data-parallel calibration, 8 of the 16" in out
    assert "per process: device peak" in out and "all 2 on one machine" in out


def test_small_models_print_in_human_units_and_plan_the_seq_len_prune_uses(tmp_path, capsys):
    from conftest import make_model

    model = make_model("llama", vocab=512)  # context 256 tokens, about 0.1 M parameters
    model.config.save_pretrained(tmp_path)
    p = plan(str(tmp_path / "config.json"), "wanda", throughput=1e9)
    assert p.seq_len == model.config.max_position_embeddings  # unset: the model's context, as prune does
    text = p.table()
    assert 1e4 < p.parameters < 1e6
    assert f"{p.parameters / 1e3:.2f} K parameters" in text and "0.00B" not in text and "0.0 GiB" not in text
    assert "KiB" in text or "MiB" in text
    seconds = p.flops / 1e9
    assert f"estimated time: {seconds:.1f} s" in text or f"estimated time: {seconds:.0f} s" in text
    with pytest.raises(ValueError, match="4096"):  # an explicit length past the context is refused, as by prune
        plan(str(tmp_path / "config.json"), "wanda", throughput=1e9, seq_len=4096)
