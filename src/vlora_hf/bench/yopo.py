"""YOPO-style visual-compute reductions on a transformers LLaVA model, implemented for real.

Our own forward loop over the LLaVA backbone's decoder layers (their weights, their norms, their rotary
embedding); nothing is masked out after being computed. With the image after ``n_before`` text tokens:

- **layer dropping** (real): visual positions take part in layers ``[0, keep_layers)`` only; from layer
  ``keep_layers`` on the sequence holds the text positions alone, so those layers neither compute nor cache
  anything for the 576 visual tokens (their KV cache holds text tokens only).
- **half-width FFN for visual positions** (real): visual rows use the first ``ffn_fraction`` of the
  intermediate channels (gate/up rows, down columns); text rows use the whole MLP.
- **visual-head pruning** (real): visual *queries* use only the first ``head_fraction`` of the query heads:
  their q-projection, attention and o-projection are computed for those heads only. Keys and values of visual
  positions stay complete, since text queries read them with every head.
- **neighbour-window attention** (real): each visual query attends to the text before the image plus the
  causal part of its own block of ``window`` visual tokens (block-local attention, one batched SDPA call),
  not to all earlier visual tokens.
- Left out: YOPO chooses the pruned heads and the FFN channels from statistics of a trained model; with
  random weights we take the first ones. No fused kernels: everything is plain PyTorch, like the baselines.

With ``YopoReductions.disabled(...)`` the loop computes exactly LLaVA's prefill and decoding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class YopoReductions:
    keep_layers: int = 8
    head_fraction: float = 0.5
    ffn_fraction: float = 0.5
    window: int = 64

    @classmethod
    def disabled(cls, num_layers: int, n_visual: int = 576) -> "YopoReductions":
        return cls(keep_layers=num_layers, head_fraction=1.0, ffn_fraction=1.0, window=n_visual)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):  # x [b, H, n, d], cos/sin [b, n, d]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class YopoLlava:
    """Prefill + greedy decoding of a `LlavaForConditionalGeneration` with YOPO-style reductions."""

    def __init__(self, llava, reductions: YopoReductions):
        self.llava = llava
        self.red = reductions
        lm = llava.model.language_model
        self.lm = lm
        cfg = lm.config
        self.n_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        group = self.heads // self.kv_heads
        kept = max(1, int(round(self.heads * reductions.head_fraction)))
        kept = max(group, kept // group * group)  # whole GQA groups
        self.kept_heads = kept
        self.kept_kv = kept // group
        inter = cfg.intermediate_size
        self.inter_vis = max(1, int(round(inter * reductions.ffn_fraction)))
        # Sliced weights for visual rows, prepared once (row slices are views; column slices are copies).
        qd, ni = kept * self.head_dim, self.inter_vis
        self.vis_w = []
        for layer in lm.layers[: reductions.keep_layers]:
            at, mlp = layer.self_attn, layer.mlp
            o_w = at.o_proj.weight if kept == self.heads else at.o_proj.weight[:, :qd].contiguous()
            d_w = mlp.down_proj.weight if ni == inter else mlp.down_proj.weight[:, :ni].contiguous()
            self.vis_w.append(
                {
                    "q_w": at.q_proj.weight[:qd],
                    "q_b": None if at.q_proj.bias is None else at.q_proj.bias[:qd],
                    "o_w": o_w,
                    "gate_w": mlp.gate_proj.weight[:ni],
                    "up_w": mlp.up_proj.weight[:ni],
                    "down_w": d_w,
                }
            )
        self.image_token_id = llava.config.image_token_index

    # ------------------------------------------------------------------ helpers
    def _heads(self, x, n_heads):  # [b, n, n_heads*d] -> [b, n_heads, n, d]
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x):  # [b, H, n, d] -> [b, n, H*d]
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def _sdpa(self, q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
        )

    @staticmethod
    def _mlp(x, gate_w, up_w, down_w, act):
        return F.linear(act(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor):
        """Returns (next_token [b], cache). The image's 576 placeholder ids must be contiguous, same place per row.

        One function on purpose (88 lines): it is the whole layer loop with YOPO's reductions inline (kept
        heads, windowed visual attention, thinned MLP, visual tokens dropped after `keep_layers`), read top to
        bottom against LLaVA's own decoder layer."""
        llava, lm, red = self.llava, self.lm, self.red
        is_img = input_ids[0] == self.image_token_id
        idx = is_img.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("yopo: input_ids hold no image tokens")
        s, n_vis = int(idx[0]), int(idx.numel())
        if int(idx[-1]) != s + n_vis - 1 or not bool((input_ids == self.image_token_id).eq(is_img).all()):
            raise ValueError("yopo: image tokens must be one contiguous run at the same place in every row")
        b, n = input_ids.shape
        feats = llava.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        vis = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        text_ids = torch.cat([input_ids[:, :s], input_ids[:, s + n_vis :]], dim=1)
        ht = lm.embed_tokens(text_ids)
        hv = vis.to(ht.dtype)
        dev = input_ids.device
        pos = torch.arange(n, device=dev).unsqueeze(0)
        pos_t = torch.cat([pos[:, :s], pos[:, s + n_vis :]], dim=1)
        cos, sin = lm.rotary_emb(ht, position_ids=pos)
        cos_t = torch.cat([cos[:, :s], cos[:, s + n_vis :]], 1)
        sin_t = torch.cat([sin[:, :s], sin[:, s + n_vis :]], 1)
        cos_v, sin_v = cos[:, s : s + n_vis], sin[:, s : s + n_vis]
        # text query -> [text keys..., visual keys...] mask by position (True = attend)
        key_pos = torch.cat([pos_t[0], pos[0, s : s + n_vis]])
        mask_tv = key_pos.unsqueeze(0) <= pos_t[0].unsqueeze(1)
        # visual blocks: keys = text before the image + causal part of the block
        win = min(red.window, n_vis)
        if n_vis % win:
            raise ValueError(f"yopo: window {win} must divide the {n_vis} visual tokens")
        nb = n_vis // win
        blk_mask = torch.cat(
            [torch.ones(win, s, dtype=torch.bool, device=dev), torch.ones(win, win, dtype=torch.bool, device=dev).tril()], dim=1
        )
        act = lm.layers[0].mlp.act_fn
        cache = []
        H, Hk, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(lm.layers[: self.n_layers]):
            at = layer.self_attn
            with_vis = i < red.keep_layers
            xt = layer.input_layernorm(ht)
            qt = _rope(self._heads(at.q_proj(xt), H), cos_t, sin_t)
            kt = _rope(self._heads(at.k_proj(xt), Hk), cos_t, sin_t)
            vt = self._heads(at.v_proj(xt), Hk)
            if not with_vis:
                ot = self._sdpa(qt, kt, vt, causal=True)
                cache.append((kt, vt))
                ht = ht + at.o_proj(self._merge(ot))
                ht = ht + layer.mlp(layer.post_attention_layernorm(ht))
                continue
            w = self.vis_w[i]
            xv = layer.input_layernorm(hv)
            kv_ = _rope(self._heads(at.k_proj(xv), Hk), cos_v, sin_v)
            vv = self._heads(at.v_proj(xv), Hk)
            qv = _rope(self._heads(F.linear(xv, w["q_w"], w["q_b"]), self.kept_heads), cos_v, sin_v)
            k_all, v_all = torch.cat([kt, kv_], 2), torch.cat([vt, vv], 2)
            cache.append((k_all, v_all))  # order: text..., visual... (positions tracked separately)
            ot = self._sdpa(qt, k_all, v_all, mask=mask_tv)
            # visual queries: kept heads, block-local attention
            hk = self.kept_kv
            kb = kv_[:, :hk].reshape(b, hk, nb, win, d)
            vb = vv[:, :hk].reshape(b, hk, nb, win, d)
            kpre = kt[:, :hk, :s].unsqueeze(2).expand(b, hk, nb, s, d)
            vpre = vt[:, :hk, :s].unsqueeze(2).expand(b, hk, nb, s, d)
            kb = torch.cat([kpre, kb], 3).reshape(b, hk * nb, s + win, d)
            vb = torch.cat([vpre, vb], 3).reshape(b, hk * nb, s + win, d)
            qb = qv.reshape(b, self.kept_heads, nb, win, d)
            if self.kept_heads != hk:  # GQA: lay query heads out as kv_head-major groups
                g = self.kept_heads // hk
                qb = qb.reshape(b, hk, g, nb, win, d).transpose(2, 3).reshape(b, hk * nb * g, win, d)
                ob = F.scaled_dot_product_attention(
                    qb, kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1), attn_mask=blk_mask
                )
                ob = ob.reshape(b, hk, nb, g, win, d).transpose(2, 3).reshape(b, self.kept_heads, n_vis, d)
            else:
                ob = F.scaled_dot_product_attention(qb.reshape(b, hk * nb, win, d), kb, vb, attn_mask=blk_mask)
                ob = ob.reshape(b, hk, n_vis, d)
            ht = ht + at.o_proj(self._merge(ot))
            hv = hv + F.linear(self._merge(ob), w["o_w"], at.o_proj.bias)
            ht = ht + layer.mlp(layer.post_attention_layernorm(ht))
            hv = hv + self._mlp(layer.post_attention_layernorm(hv), w["gate_w"], w["up_w"], w["down_w"], act)
        last = lm.norm(ht[:, -1:])
        logits = llava.lm_head(last)[:, -1]
        return logits, {"kv": cache, "next_pos": n}

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode(self, token: torch.Tensor, state: dict):
        """One greedy step for tokens [b]; returns (logits [b, V], state)."""
        lm, H, Hk = self.lm, self.heads, self.kv_heads
        h = lm.embed_tokens(token[:, None])
        p = state["next_pos"]
        cos, sin = lm.rotary_emb(h, position_ids=torch.full((1, 1), p, dtype=torch.long, device=token.device))
        cache = state["kv"]
        for i, layer in enumerate(lm.layers[: self.n_layers]):
            at = layer.self_attn
            x = layer.input_layernorm(h)
            q = _rope(self._heads(at.q_proj(x), H), cos, sin)
            k = _rope(self._heads(at.k_proj(x), Hk), cos, sin)
            v = self._heads(at.v_proj(x), Hk)
            kc, vc = cache[i]
            kc, vc = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
            cache[i] = (kc, vc)
            o = self._sdpa(q, kc, vc)
            h = h + at.o_proj(self._merge(o))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        state["next_pos"] = p + 1
        return self.llava.lm_head(lm.norm(h))[:, -1], state

    @staticmethod
    def cache_bytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for kv in state["kv"] for t in kv)
