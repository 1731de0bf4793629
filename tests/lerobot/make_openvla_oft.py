"""A tiny OpenVLA-OFT checkpoint in the published layout, and what it predicts.

Run in the LeRobot environment (``scripts/lerobot-env``: timm 0.9.16 and transformers are
there): ``make_openvla_oft.py OUT`` writes ``OUT/checkpoint`` as OpenVLA-OFT publishes a
fine-tune (``config.json``, sharded ``model-*.safetensors`` with their index, the action
head and proprio projector as DDP-prefixed ``.pt`` state dicts, ``dataset_statistics.json``,
``preprocessor_config.json``, a Llama-style tokenizer) and ``OUT/case.safetensors``: an
observation and the actions OFT's inference computes for it. The model is built from the
classes OpenVLA's modeling code builds on: timm's ``VisionTransformer`` for the DINOv2-reg
and SigLIP towers (read at the second-to-last block, LayerScale's ``gamma`` stored as
``scale_factor``), transformers' Llama with bidirectional attention, and the projector,
proprio projector and MLP-ResNet head written from OFT's published module layout; the
prediction follows OFT's ``predict_action`` (placeholders zeroed, the head reading the last
chunk × action_dim hidden states, BOUNDS_Q99 (un)normalisation with the mask).

``make_openvla_oft.py --layout FILE`` writes the names and shapes of the real-size
OpenVLA-OFT (LIBERO: 8 × 7 actions, 8-d proprio) as these classes build it, as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import tv_ops  # noqa: E402,F401  (before timm imports torchvision)

IDS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
MEANS = [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]]
STDS = [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]
VOCAB, PAD_ID, EMPTY_ID, STOP_ID = 32064, 32000, 29871, 2
WORDS = ["In", ":", "What", "action", "should", "the", "robot", "take", "to", "?", "Out",
         "pick", "up", "black", "bowl", "and", "place", "it", "on", "plate"]


class MLPResNetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim)
                                               for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class ActionHead(nn.Module):  # OFT's L1RegressionActionHead
    def __init__(self, input_dim, hidden_dim, action_dim):
        super().__init__()
        self.model = MLPResNet(2, input_dim * action_dim, hidden_dim, action_dim)


class ProprioProjector(nn.Module):
    def __init__(self, llm_dim, proprio_dim):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act_fn1(self.fc1(x)))


class Projector(nn.Module):  # the fused-backbone PrismaticProjector
    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def towers(img: int, dino: dict | None = None, siglip: dict | None = None):
    """OpenVLA's DINOv2-reg + SigLIP pair (the real ones, or timm ViTs of these kwargs)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if dino is None:
        return [timm.create_model(i, pretrained=False, num_classes=0, img_size=img)
                for i in IDS]
    return [VisionTransformer(img_size=img, num_classes=0, reg_tokens=4, no_embed_class=True,
                              init_values=1e-5, **dino),
            VisionTransformer(img_size=img, num_classes=0, class_token=False,
                              global_pool="map", **siglip)]


def vla_state(vit, projector, llm) -> dict:
    """The VLA's weights under the published names (LayerScale ``gamma`` -> ``scale_factor``)."""
    out = {}
    for prefix, module in (("vision_backbone.featurizer.", vit[0]),
                           ("vision_backbone.fused_featurizer.", vit[1]),
                           ("projector.", projector), ("language_model.", llm)):
        for k, v in module.state_dict().items():
            out[prefix + k.replace(".gamma", ".scale_factor")] = v
    return out


def layout(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    vit = towers(224)
    dv = sum(t.embed_dim for t in vit)
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=4096,
                                           intermediate_size=11008, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=32))
        projector = Projector(dv, 4096)
        head, proprio = ActionHead(4096, 4096, 7), ProprioProjector(4096, 8)
    shapes = {k: list(v.shape) for k, v in vla_state(vit, projector, llm).items()}
    shapes |= {f"action_head.{k}": list(v.shape) for k, v in head.state_dict().items()}
    shapes |= {f"proprio_projector.{k}": list(v.shape) for k, v in proprio.state_dict().items()}
    path.write_text(json.dumps(shapes))


def write_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = [f"<t{i}>" for i in range(PAD_ID + 1)]  # Llama's ids, the words among them
    for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS]):
        names[i] = w
    names[EMPTY_ID], names[PAD_ID] = "\u2581", "<PAD>"
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<PAD>")
    fast.save_pretrained(out)
    return fast


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Weights of unit-ish scale everywhere (LayerScale and norms included), so that every
    part of the model changes the output."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        one = name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight",
                             "scale_factor", "gamma", "layer_norm1.weight",
                             "layer_norm2.weight", "ffn.0.weight"))
        with torch.no_grad():
            p.copy_(1 + 0.1 * noise if one else 0.15 * noise)


def main(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    img, d, chunk, adim, pdim, cams = 56, 64, 8, 3, 5, 2
    vit = towers(img, dict(patch_size=14, embed_dim=64, depth=3, num_heads=16, mlp_ratio=4),
                 dict(patch_size=14, embed_dim=80, depth=3, num_heads=16, mlp_ratio=3.7362))
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       rms_norm_eps=1e-6, pad_token_id=PAD_ID, attn_implementation="eager")
    llm = LlamaForCausalLM(text)
    projector = Projector(sum(t.embed_dim for t in vit), d)
    head, proprio_proj = ActionHead(d, d, adim), ProprioProjector(d, pdim)
    modules = [*vit, llm, projector, head, proprio_proj]
    for m in modules:
        randomize(m, gen)
        m.eval()

    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in vla_state(vit, projector, llm).items()}
    names = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, ckpt / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size()
                                            for v in state.values())},
             "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    torch.save({f"module.{k}": v for k, v in head.state_dict().items()},
               ckpt / "action_head--10_checkpoint.pt")
    torch.save({f"module.{k}": v for k, v in proprio_proj.state_dict().items()},
               ckpt / "proprio_projector--10_checkpoint.pt")
    config = {"architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
              "use_fused_vision_backbone": True, "image_sizes": [img, img],
              "timm_model_ids": IDS, "timm_override_act_layers": [None, None],
              "image_resize_strategy": "resize-naive", "llm_backbone_id": "llama2-7b-pure",
              "pad_token_id": PAD_ID, "pad_to_multiple_of": 64, "n_action_bins": 256,
              "text_config": text.to_dict()}
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    (ckpt / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "PrismaticImageProcessor", "means": MEANS, "stds": STDS,
         "input_sizes": [[3, img, img]] * 2, "use_fused_vision_backbone": True}))

    def bounds(n):
        lo = torch.randn(n, generator=gen)
        return lo, lo + 0.5 + torch.rand(n, generator=gen)

    a_lo, a_hi = bounds(adim)
    p_lo, p_hi = bounds(pdim)
    a_mask = [True] * (adim - 1) + [False]  # the gripper is not normalised
    stats = {"libero_spatial_no_noops": {
        "action": {"q01": a_lo.tolist(), "q99": a_hi.tolist(), "mask": a_mask,
                   "mean": [0.0] * adim, "std": [1.0] * adim, "min": (a_lo - 1).tolist(),
                   "max": (a_hi + 1).tolist()},
        "proprio": {"q01": p_lo.tolist(), "q99": p_hi.tolist(), "mean": [0.0] * pdim,
                    "std": [1.0] * pdim, "min": (p_lo - 1).tolist(), "max": (p_hi + 1).tolist()},
        "num_transitions": 1000, "num_trajectories": 10}}
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    tok = write_tokenizer(ckpt)

    # -- the observation and OFT's prediction for it ------------------------------------
    b, task = 2, "pick up the black bowl and place it on the plate"
    images = [torch.randint(0, 256, (b, 3, img, img), generator=gen, dtype=torch.uint8)
              for _ in range(cams)]
    state_raw = p_lo + (p_hi - p_lo) * torch.rand(b, pdim, generator=gen) * 1.2 - 0.1
    ids = tok(f"In: What action should the robot take to {task.lower()}?\nOut:")["input_ids"]
    if ids[-1] != EMPTY_ID:
        ids = ids + [EMPTY_ID]
    ids = torch.tensor([ids] * b)
    with torch.no_grad():
        feats = []
        for x in images:
            x = x.float() / 255
            per_tower = [
                t.get_intermediate_layers((x - torch.tensor(m).view(1, 3, 1, 1))
                                          / torch.tensor(s).view(1, 3, 1, 1),
                                          n={len(t.blocks) - 2})[0]
                for t, m, s in zip(vit, MEANS, STDS, strict=True)]
            feats.append(torch.cat(per_tower, 2))
        patches = projector(torch.cat(feats, 1))  # (B, P, D)
        mask = torch.tensor(stats["libero_spatial_no_noops"]["action"]["mask"])
        proprio = torch.clamp(2 * (state_raw - p_lo) / (p_hi - p_lo + 1e-8) - 1, -1, 1)
        patches = torch.cat([patches, proprio_proj(proprio)[:, None]], 1)
        full = torch.cat([ids, torch.ones(b, chunk * adim, dtype=torch.long),
                          torch.full((b, 1), STOP_ID)], 1)
        embs = llm.get_input_embeddings()(full)
        is_action = torch.zeros_like(full, dtype=torch.bool)
        is_action[:, ids.shape[1]: ids.shape[1] + chunk * adim] = True
        embs = embs * ~is_action[..., None]
        seq = torch.cat([embs[:, :1], patches, embs[:, 1:]], 1)
        n = seq.shape[1]
        bidirectional = torch.zeros(b, 1, n, n)  # an additive 4-D mask: every token sees all
        h = llm.model(inputs_embeds=seq, attention_mask=bidirectional).last_hidden_state
        # the same hidden states with a causal mask differ: the mask is honoured
        causal = llm.model(inputs_embeds=seq).last_hidden_state
        assert (causal[:, :10] - h[:, :10]).abs().max() > 1e-3
        hidden = h[:, -chunk * adim:]  # OFT's inference read: the last chunk·Da states
        norm_actions = head.model(hidden.reshape(b, chunk, adim * d))
        lo, hi = a_lo, a_hi
        actions = torch.where(mask, 0.5 * (norm_actions + 1) * (hi - lo + 1e-8) + lo,
                              norm_actions)
    hwc = [x.permute(0, 2, 3, 1).contiguous() for x in images]  # memvla's (B, H, W, C)
    save_file({"observation.images.image": hwc[0], "observation.images.wrist_image": hwc[1],
               "observation.state": state_raw, "normalized_actions": norm_actions,
               "actions": actions.contiguous()}, out / "case.safetensors")
    (out / "case.json").write_text(json.dumps({"task": task, "chunk": chunk}))
    print("made", ckpt, np.round(actions[0, 0].numpy(), 4))


if __name__ == "__main__":
    if sys.argv[1] == "--layout":
        layout(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
