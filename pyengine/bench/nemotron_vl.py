"""The Nemotron VL reranker presets of ``python -m pyengine.bench vision``: a random
checkpoint saved as the hub's (config.json of model_type llama_nemotron_vl_rerank, a
word-level tokenizer with <img>, </img>, <IMG_CONTEXT>), and transformers' baseline on
the same weights: its SigLIP vision model and Llama with an all-visible padding mask,
the 2 x 2 regrouping and mlp1 in torch, the mean of each prompt's tokens, the fp32 score.
(The checkpoint's own model is remote code, which nothing here runs.)"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

SPECIAL = ["<img>", "<IMG_CONTEXT>", "</img>"]
# name -> (Llama config, SigLIP config, tile size)
PRESETS = {
    # 16 tokens a tile
    "nemotron-vl-tiny": (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2),
                         dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
                              patch_size=16), 128),
    # Llama-3.2-1B's shapes behind a SigLIP-base tower at 512-pixel tiles (256 tokens a
    # tile); random weights.
    "nemotron-vl-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
                       dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            patch_size=16), 512),
}


def _tokenizer(vocab):
    """Word-level ids t0..t{vocab-1}, then the three image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   additional_special_tokens=SPECIAL)


def checkpoint(name, vocab, dtype, device, cache_dir, seed):
    """(path, {image_token_id, start, end}) of the preset saved once under cache_dir (built
    in a temporary directory and renamed, so that a run killed part-way leaves none)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    from .presets import _randomize, building

    text, vis, tile = PRESETS[name]
    tok = _tokenizer(vocab)
    ids = dict(zip(("start", "image_token_id", "end"), tok.convert_tokens_to_ids(SPECIAL)))
    path = os.path.join(cache_dir, f"{name}-{str(dtype).split('.')[-1]}-{seed}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path, ids
    llm_cfg = LlamaConfig(**text, vocab_size=len(tok), max_position_embeddings=32768)
    vis_cfg = SiglipVisionConfig(**vis, image_size=tile)
    torch.manual_seed(seed)
    with torch.device(device):
        vision, lm = SiglipVisionModel(vis_cfg).to(dtype), LlamaModel(llm_cfg).to(dtype)
        M, H = 4 * vis_cfg.hidden_size, llm_cfg.hidden_size
        mlp1 = nn.Sequential(nn.LayerNorm(M), nn.Linear(M, H), nn.GELU(), nn.Linear(H, H)).to(dtype)
    for m in (vision, lm, mlp1):
        _randomize(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = {"score.weight": (torch.randn(1, H, generator=g) * H ** -0.5).to(dtype)}
    for pre, m in (("model.vision_model.", vision), ("model.language_model.", lm), ("model.mlp1.", mlp1)):
        w.update({pre + k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()})
    llm_raw = dict(llm_cfg.to_dict(), architectures=["LlamaBidirectionalModel"], model_type="llama_bidirec",
                   pooling="avg")
    cfg = {"architectures": ["LlamaNemotronVLForSequenceClassification"], "model_type": "llama_nemotron_vl_rerank",
           "llm_config": llm_raw, "vision_config": vis_cfg.to_dict(), "force_image_size": tile,
           "downsample_ratio": 0.5, "select_layer": -1, "img_context_token_id": ids["image_token_id"],
           "pooling": "avg", "temperature": 1.0, "num_labels": 1, "dynamic_image_size": True,
           "min_dynamic_patch": 1, "max_dynamic_patch": 2, "use_thumbnail": True}
    with building(path, "model.safetensors") as tmp:
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        save_file(w, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return path, ids


class Baseline:
    """transformers' parts of the reranker on the checkpoint's weights."""

    def __init__(self, path, dtype, device):
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        w = load_file(os.path.join(path, "model.safetensors"))

        def part(pre):
            return {k[len(pre):]: v for k, v in w.items() if k.startswith(pre)}
        llm = {k: v for k, v in cfg["llm_config"].items() if k not in ("model_type", "architectures", "pooling")}
        vis = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
        vis_cfg, llm_cfg = SiglipVisionConfig(**vis), LlamaConfig(**llm)
        vis_cfg._attn_implementation = llm_cfg._attn_implementation = "sdpa"
        self.vision, self.lm = SiglipVisionModel(vis_cfg), LlamaModel(llm_cfg)
        M, H = 4 * vis["hidden_size"], llm["hidden_size"]
        self.mlp1 = nn.Sequential(nn.LayerNorm(M), nn.Linear(M, H), nn.GELU(), nn.Linear(H, H))
        for m, pre in ((self.vision, "model.vision_model."), (self.lm, "model.language_model."),
                       (self.mlp1, "model.mlp1.")):
            m.load_state_dict(part(pre))
            m.to(device, dtype).eval()
        self.score = w["score.weight"].float().to(device)
        self.ctx = cfg["img_context_token_id"]
        self.dtype, self.device = dtype, device

    def features(self, tiles):
        x = self.vision(pixel_values=tiles.to(self.device, self.dtype)).last_hidden_state
        n, L, C = x.shape
        s = int(L ** 0.5)
        # 2 x 2 neighbouring patches side by side, row-major, as the checkpoint regroups them
        x = x.view(n, s // 2, 2, s // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * C)
        return self.mlp1(x).reshape(-1, self.score.shape[1])

    def run(self, prepared, batch):
        """Probabilities of (expanded ids, tiles, _) prompts, length-sorted, right-padded."""
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))
        out = torch.empty(len(prepared), 1)
        with torch.inference_mode():
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                width = max(len(prepared[i][0]) for i in idx)
                ids = torch.zeros((len(idx), width), dtype=torch.long)
                keep = torch.zeros((len(idx), width), dtype=torch.bool)
                for j, i in enumerate(idx):
                    ids[j, :len(prepared[i][0])] = torch.tensor(prepared[i][0])
                    keep[j, :len(prepared[i][0])] = True
                ids, keep = ids.to(self.device), keep.to(self.device)
                x = self.lm.embed_tokens(ids)
                x[ids == self.ctx] = self.features(torch.cat([prepared[i][1] for i in idx])).to(x.dtype)
                # additive mask: every real token sees every real token of its prompt
                mask = torch.zeros(len(idx), 1, width, width, dtype=x.dtype, device=self.device)
                mask.masked_fill_(~keep[:, None, None, :], torch.finfo(x.dtype).min)
                h = self.lm(inputs_embeds=x, attention_mask=mask).last_hidden_state.float()
                pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
                out[idx] = (pooled @ self.score.t()).sigmoid().cpu()
        return out
