"""Benchmark: code paths on toy sizes (no timing assertions), FLOPs formulas, YOPO == LLaVA when disabled."""

import json

import pytest
import torch

from transformers import CLIPVisionConfig, LlamaConfig

from vlora_hf import VLoRAConfig
from vlora_hf import flops as F
from vlora_hf.bench import flops as B
from vlora_hf.bench.run import BenchSettings, build_systems, greedy, main
from vlora_hf.bench.systems import Llava, Yopo
from vlora_hf.bench.yopo import YopoReductions


def small_config(**text):
    """hidden 8, MLP 16, 2 layers of 2 heads, vocab 10; a 28 px / 14 px tower (4 positions) of width 6; a
    width-4 generator of rank 2 for q and v on layer 1 only."""
    return VLoRAConfig(
        text_config=LlamaConfig(**{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "num_key_value_heads": 2, **text}),
        vision_config=CLIPVisionConfig(hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        generator_hidden_size=4, generator_depth=1, generator_num_heads=2, lora_rank=2, target_modules="qv",
        skip_layers=2)


def test_flops_llm_hand_computed():
    c = small_config()
    # q,o: 2·8·8 each; k,v: 2·8·8 each; MLP: 3·2·8·16
    assert F.decoder_token(c) == 128 + 256 + 128 + 768 == 1280
    # 3 visual tokens after 1 text token: contexts 2+3+4 = 9 → 4·9·8 attention; 2 layers; projector 6→8→8
    assert F.llava_visual(c, n_visual=3, n_before=1) == 2 * (3 * 1280 + 4 * 9 * 8) + (2 * 3 * 6 * 8 + 2 * 3 * 8 * 8) == 8928
    # 4-token causal prefill (contexts 1+2+3+4) + LM head on one row
    assert F.prefill(c, 4, logits_rows=1) == 2 * (4 * 1280 + 4 * 10 * 8) + 2 * 8 * 10 == 11040
    assert F.decode_token(c, context=5) == 2 * (1280 + 4 * 5 * 8) + 160 == 3040
    # GQA: one key/value head of width 4 makes k and v half as wide
    assert F.decoder_token(small_config(num_key_value_heads=1)) == 128 + 2 * (2 * 8 * 4) + 128 + 768 == 1152


def test_flops_generator_and_yopo_hand_computed():
    c = small_config()
    assert c.receiving_layers == [1] and c.num_visual_positions == 4
    block = 96 + 16 + 32 + (32 + 256 + 64 + 32) + (128 + 128)  # self-attn, cross-attn over 4 positions, MLP
    head = 2 * 1 * 4 * (8 * 2)  # one slot: A of width 8 x rank 2
    assert F.generator(c) == 2 * 4 * 6 * 4 + 2 * (block + head) == 2016
    assert F.lowrank_per_token(c) == 2 * (2 * 8 * 2 + 2 * 2 * 8) == 128
    y = YopoReductions(keep_layers=1, head_fraction=0.5, ffn_fraction=0.5, window=2)
    proj = 64 + 256 + 64 + 3 * 2 * 8 * 8  # half q/o, full k/v, half MLP
    # blocks of 2 and 1 visual tokens after 1 text token: contexts (2+3) + 2 = 7, over 1 of 2 heads (width 4)
    assert B.yopo_visual(c, y, n_visual=3, n_before=1) == 3 * proj + 4 * 7 * 4 + 672 == 3088


def test_flops_paper_7b_close_to_reported():
    s = B.paper_7b()
    assert s["visual_gflops"]["llava"] / 1e3 == pytest.approx(B.PAPER_LLAVA_7B_VISUAL_TFLOPS, rel=0.03)
    assert s["visual_gflops"]["llava"] == pytest.approx(7571.943456768)
    assert s["visual_gflops"]["vlora"] == pytest.approx(132.164616192)  # generator 129.48 + low-rank 2.68
    assert s["visual_gflops"]["yopo"] == pytest.approx(1112.587370496)
    assert s["tower_gflops"] == pytest.approx(381.918216192)


@pytest.fixture(scope="module")
def toy_llava():
    st = BenchSettings.toy()
    from vlora_hf.bench.systems import build_llava

    return st, build_llava(st.sizes)


def _toy_inputs(st, batch=2, T=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (batch, T), generator=g)
    ids[:, 0] = 1
    px = torch.randn(batch, 3, st.sizes.image_size, st.sizes.image_size, generator=g)
    return ids, px


@pytest.mark.slow
def test_yopo_disabled_matches_llava(toy_llava):
    st, llava = toy_llava
    n_vis = llava.config.image_seq_length
    ref, yopo = Llava(llava), Yopo(llava, YopoReductions.disabled(st.sizes.llm_layers, n_vis))
    ids, px = _toy_inputs(st)
    l_ref, s_ref = ref.prefill(ref.prepare(ids, px))
    l_y, s_y = yopo.prefill(yopo.prepare(ids, px))
    assert torch.equal(l_ref.argmax(-1), l_y.argmax(-1))
    torch.testing.assert_close(l_y, l_ref, atol=1e-4, rtol=1e-4)
    tok = l_ref.argmax(-1)
    d_ref, s_ref = ref.decode(tok, s_ref)
    d_y, s_y = yopo.decode(tok, s_y)
    torch.testing.assert_close(d_y, d_ref, atol=1e-4, rtol=1e-4)
    assert yopo.cache_bytes(s_y) == ref.cache_bytes(s_ref)
    g_ref, _ = greedy(ref, ref.prepare(ids, px), 4)
    g_y, _ = greedy(yopo, yopo.prepare(ids, px), 4)
    assert torch.equal(g_ref, g_y)


def test_yopo_reductions_shrink_cache(toy_llava):
    st, llava = toy_llava
    ref, yopo = Llava(llava), Yopo(llava, YopoReductions(keep_layers=2, window=8))
    ids, px = _toy_inputs(st)
    logits, state = yopo.prefill(yopo.prepare(ids, px))
    assert logits.shape == (2, st.sizes.vocab)
    _, s_ref = ref.prefill(ref.prepare(ids, px))
    # 4 layers: 2 keep 16 visual + 6 text positions, 2 keep the 6 text positions only
    assert yopo.cache_bytes(state) * 22 * 2 == ref.cache_bytes(s_ref) * (22 + 6)
    with pytest.raises(ValueError, match="window"):
        Yopo(llava, YopoReductions(keep_layers=2, window=5)).prefill(yopo.prepare(ids, px))


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    js, md, png = tmp_path / "b.json", tmp_path / "docs" / "bench.md", tmp_path / "docs" / "ttft.png"
    assert main(["--toy", "--repeats", "1", "--json", str(js), "--markdown", str(md), "--plot", str(png)]) == 0
    r = json.loads(js.read_text())
    med = r["medians"]
    # the headline ratios are ratios of the reported medians
    assert r["llm_overhead_decode"] == pytest.approx(med["decode_ms_per_token"]["vlora"]
                                                     / med["decode_ms_per_token"]["text_only"])
    assert r["ttft_ratio_vs_llava_t64"] == pytest.approx(med["ttft_ms_t8"]["vlora"] / med["ttft_ms_t8"]["llava"])
    assert r["throughput_ratio_vs_llava_b8"] == pytest.approx(med["throughput_tok_per_s_b2"]["vlora"]
                                                              / med["throughput_tok_per_s_b2"]["llava"])
    # the toy cache: 8 text positions (VLoRA, text-only) vs 8 + 16 visual (LLaVA); YOPO keeps the visual ones
    # in 2 of its 4 layers
    kv = med["kv_cache_bytes"]
    assert kv["vlora"] == kv["text_only"] and kv["llava"] == 3 * kv["vlora"] and kv["yopo"] == 2 * kv["vlora"]
    assert r["kv_cache_ratio_vs_llava"] == pytest.approx(1 / 3)
    st = BenchSettings.toy()
    assert r["flops"]["bench"] == json.loads(json.dumps(st.sizes.flops(YopoReductions(**r["settings"]["yopo"]), 8)))
    assert sorted(r["targets"]) == sorted(["llm_overhead_prefill <= 1.05", "llm_overhead_decode <= 1.05",
                                           "ttft_ratio_vs_llava_t64 <= 0.25", "throughput_ratio_vs_llava_b8 >= 3",
                                           "vlora faster than yopo at T=64 (ttft_ratio_vs_yopo_t64 < 1)"])
    text = md.read_text()
    assert "| TTFT, T=4 |" in text and "![TTFT vs text length](ttft.png)" in text
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_same_weights_everywhere():
    st = BenchSettings.toy()
    systems = build_systems(st)
    llava = systems["llava"].model
    for sd_name, sd in (("text_only", systems["text_only"].model.model.state_dict()),
                        ("vlora", systems["vlora"].model.model.language_model.state_dict())):
        ref = llava.model.language_model.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref), sd_name
    tower = systems["vlora"].model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in llava.model.vision_tower.state_dict().items())


def test_bench_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_serving_bench_width_option():
    from vlora_hf.serving.bench import bench_sizes

    wide = bench_sizes(quick=True, width=512)  # --width wins over --quick
    assert (wide.llm_hidden, wide.tower_hidden, wide.llm_heads()) == (512, 128, 8)
    assert (bench_sizes(quick=True).llm_hidden, bench_sizes(quick=False).llm_hidden) == (128, 256)
    with pytest.raises(ValueError, match="multiple of 64"):
        bench_sizes(quick=False, width=100)
