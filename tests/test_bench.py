"""Benchmark: code paths on toy sizes (no timing assertions), FLOPs formulas, YOPO == LLaVA when disabled."""

import json

import pytest
import torch

from vlora_hf.bench import flops as F
from vlora_hf.bench.run import BenchSettings, build_systems, greedy, main
from vlora_hf.bench.systems import Llava, Yopo
from vlora_hf.bench.yopo import YopoReductions

G = F.LLMGeom(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10)


def test_flops_llm_hand_computed():
    # q,o: 2·8·8 each; k,v: 2·8·8 each; MLP: 3·2·8·16
    assert F.llm_token_proj(G) == 128 + 256 + 128 + 768 == 1280
    # 3 visual tokens after 1 text token: contexts 2+3+4 = 9 → 4·9·8 attention; 2 layers
    assert F.llava_visual(G, n_visual=3, n_before=1) == 2 * (3 * 1280 + 4 * 9 * 8) == 8256
    # 4-token causal prefill (contexts 1+2+3+4) + LM head on one row
    assert F.prefill(G, 4) == 2 * (4 * 1280 + 4 * 10 * 8) + 2 * 8 * 10 == 11040
    assert F.decode_token(G, context=5) == 2 * (1280 + 4 * 5 * 8) + 160


def test_flops_generator_and_yopo_hand_computed():
    gg = F.GenGeom(dim=4, depth=1, visual_dim=6, positions=3, rank=2, types=2, target_layers=1)
    block = 96 + 16 + 32 + (32 + 192 + 48 + 32) + (128 + 128)  # self-attn, cross-attn, FFN for 1 query
    head = 2 * 1 * 4 * (8 * 2)
    assert F.generator(gg, llm_hidden=8) == 2 * 3 * 6 * 4 + 2 * (block + head) == 1808
    assert F.lowrank_per_token(gg, llm_hidden=8) == 2 * (2 * 8 * 2 + 2 * 2 * 8) == 128
    y = F.YopoGeom(keep_layers=1, head_fraction=0.5, ffn_fraction=0.5, window=2)
    proj = 64 + 256 + 64 + 3 * 2 * 8 * 8  # half q/o, full k/v, half MLP
    # blocks of 2 and 1 visual tokens after 1 text token: contexts (2+3) + 2 = 7, over 1 of 2 heads (width 4)
    assert F.yopo_visual(G, y, n_visual=3, n_before=1) == 3 * proj + 4 * 7 * 4 == 2416


def test_flops_paper_7b_close_to_reported():
    s = F.paper_7b()
    assert s["visual_gflops"]["llava"] / 1e3 == pytest.approx(F.PAPER_LLAVA_7B_VISUAL_TFLOPS, rel=0.03)
    assert s["visual_gflops"]["vlora"] < 0.05 * s["visual_gflops"]["llava"]
    assert s["visual_gflops"]["yopo"] < 0.2 * s["visual_gflops"]["llava"]


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
    for key in ("ttft_ratio_vs_llava_t64", "ttft_ratio_vs_yopo_t64", "throughput_ratio_vs_llava_b8",
                "llm_overhead_prefill", "llm_overhead_decode", "kv_cache_ratio_vs_llava", "generator_ms"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert set(r["medians"]["decode_ms_per_token"]) == {"text_only", "vlora", "llava", "yopo"}
    assert len(r["targets"]) == 5 and all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert r["medians"]["kv_cache_bytes"]["llava"] > r["medians"]["kv_cache_bytes"]["vlora"]
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
