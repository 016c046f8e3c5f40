#!/usr/bin/env python3
"""Tiny random-weight Phi-4-multimodal checkpoint (hub layout) + reference outputs.

Run from the repository root:  python reference/make_tiny.py
Writes fixtures/tiny/ (checkpoint, config, tokenizer) and fixtures/expected/ (values computed
by transformers' native Phi4MultimodalForCausalLM in float32, eager attention).
Spec references (§x) point at shared/design/architecture.md.
"""
import json, math, os, re, shutil, zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (AutoTokenizer, Phi4MultimodalConfig, Phi4MultimodalForCausalLM,
                          TokenizersBackend)

from texts import CHATS, EXTRA, LANGS, SYSTEM

SEED = int(os.environ.get("PHI4MM_SEED", 1245))
SHARED = Path(os.environ.get("PHI4MM_FILES", Path(__file__).resolve().parents[2] / "shared" / "phi4mm-files"))
TINY, EXP = Path("fixtures/tiny"), Path("fixtures/expected")
SHORT, LONG = [1.0, 1.0, 1.0], [1.0, 3.5, 17.0]  # rotary dims 6 => 3 factors (§2.3/§2.4)
ATTN_FACTOR = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))  # 1.1902380714238083
EOS_IDS = (200020, 199999)
DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
VISION_CONFIG = dict(  # native Phi4MultimodalVisionConfig keys
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_channels=3,
    image_size=448, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    attention_dropout=0.0, crop_size=448, image_token_id=200010, feature_layer=-2)
AUDIO_CONFIG = dict(  # native Phi4MultimodalAudioConfig keys
    hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=2, activation="swish",
    chunk_size=-1, left_chunk=18, dropout_rate=0.0, ext_pw_out_channel=32,
    depthwise_separable_out_channel=32, depthwise_multiplier=1, kernel_size=3, conv_activation="swish",
    input_size=80, conv_glu_type="swish", time_reduction=8, bias_max_distance=500, bias_symmetric=False,
    nemo_activation="relu", nemo_conv_channels=32, downsample_rate=1, initializer_range=0.02,
    audio_token_id=200011, feature_layer=-2)


# ----------------------------------------------------------------------------- config (§1.2)
def hub_config():
    audio_proc = {  # hub `audio_processor.config` keys (original remote-code names), tiny sizes
        "activation": "swish", "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
        "attention_dim": 32, "attention_heads": 2, "batch_norm": False, "bias_in_glu": True, "causal": True,
        "chunk_size": -1, "cnn_layer_norm": True, "conv_activation": "swish", "conv_glu_type": "swish",
        "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 32, "dropout_rate": 0.0,
        "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1, "ext_pw_out_channel": 32,
        "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3, "left_chunk": 18, "linear_units": 48,
        "nemo_conv_settings": {"conv_channels": 32}, "num_blocks": 2,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"}, "time_reduction": 8}
    return {
        "_name_or_path": "Phi-4-multimodal-instruct-tiny-random",
        "architectures": ["Phi4MMForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "audio_processor": {"config": audio_proc, "name": "cascades"},
        "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                     "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM", "AutoTokenizer": "Xenova/gpt-4o"},
        "bos_token_id": 199999,
        "embd_layer": {
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                                 "enable_gradient_checkpointing": True, "projection_cls": "mlp",
                                 "use_conv_downsample": False, "use_qformer": False},
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image", "enable_gradient_checkpointing": True,
                                 "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                                 "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True}},
        "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 64, "interpolate_factor": 1, "lm_head_bias": False,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi4mm", "num_attention_heads": 4,
        "num_hidden_layers": 3, "num_key_value_heads": 2, "original_max_position_embeddings": 4096,
        "pad_token_id": 199999, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG, "short_factor": SHORT, "type": "longrope"}, "rope_theta": 10000.0,
        "sliding_window": 262144,
        "speech_lora": {"dp": 0.01, "layer": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
                        "lora_alpha": 18, "r": 12},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.46.1", "use_cache": True,
        "vision_lora": {"dp": 0.0, "layer": r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))",
                        "lora_alpha": 16, "r": 8},
        "vocab_size": 200064,
        # optional extras (not in the hub file): the towers in transformers-native key names
        "vision_config": VISION_CONFIG, "audio_config": AUDIO_CONFIG}


def native_config(hub):
    """Hub config -> Phi4MultimodalConfig, following the official convert_config [HF-conv]."""
    c = json.loads(json.dumps(hub))
    for k in ("_name_or_path", "architectures", "auto_map", "vision_lora", "speech_lora", "transformers_version",
              "_attn_implementation", "embd_layer", "model_type", "torch_dtype", "vision_config", "audio_config"):
        c.pop(k, None)
    a = c.pop("audio_processor")["config"]
    for k in ("activation_checkpointing", "cnn_layer_norm", "input_layer", "batch_norm", "encoder_embedding_config",
              "ext_pw_kernel_size", "bias_in_glu", "causal"):
        a.pop(k)
    a["hidden_size"], a["num_attention_heads"] = a.pop("attention_dim"), a.pop("attention_heads")
    a["intermediate_size"] = a.pop("linear_units")
    a["nemo_conv_channels"] = a.pop("nemo_conv_settings")["conv_channels"]
    a["bias_max_distance"] = a.pop("relative_attention_bias_args")["t5_bias_max_distance"]
    # the hub key is misspelled "seperable"; the official converter passes it through unchanged and the native
    # class silently uses its default 1024 (harmless at full size, wrong for a tiny tower) -> rename here
    a["depthwise_separable_out_channel"] = a.pop("depthwise_seperable_out_channel")
    a["downsample_rate"] = hub["embd_layer"]["audio_embd_layer"]["downsample_rate"]
    assert all(hub["audio_config"][k] == v for k, v in a.items()), "audio_processor vs audio_config disagree"
    assert hub["vision_config"]["crop_size"] == hub["embd_layer"]["image_embd_layer"]["crop_size"]
    c["eos_token_id"] = [199999, 200020]
    cfg = Phi4MultimodalConfig(**c, vision_config=dict(hub["vision_config"]), audio_config=dict(hub["audio_config"]))
    cfg._attn_implementation = "eager"
    return cfg


# ----------------------------------------------------------------------------- weights (§3.4, §7)
HUB_TO_NATIVE = [  # [HF-conv] STATE_DICT_MAPPING (regex on the hub name)
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.net\.0\.linear", r"\1.gate_up_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.net\.2", r"\1.down_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_(q|k|v)", r"\1.\2_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_out", r"\1.o_proj"),
    (r"image_embed\.img_projection\.0", "image_embed.img_projection_up"),
    (r"image_embed\.img_projection\.2", "image_embed.img_projection_down"),
    (r"image_embed\.glb_GN", "image_embed.global_img_feature_extensor"),
    (r"image_embed\.sub_GN", "image_embed.sub_img_feature_extensor"),
    (r"audio_embed\.audio_projection\.speech\.0", "audio_embed.up_proj_for_speech"),
    (r"audio_embed\.audio_projection\.speech\.2", "audio_embed.down_proj_for_speech"),
    (r"audio_embed\.audio_projection\.vision\.0", "audio_embed.up_proj_for_vision_speech"),
    (r"audio_embed\.audio_projection\.vision\.2", "audio_embed.down_proj_for_vision_speech")]
NATIVE_TO_HUB = [  # exact inverse of the above
    (r"(feed_forward_(?:in|out))\.gate_up_proj", r"\1.net.0.linear"), (r"(feed_forward_(?:in|out))\.down_proj", r"\1.net.2"),
    (r"(encoders\.\d+\.self_attn)\.(q|k|v)_proj", r"\1.linear_\2"), (r"(encoders\.\d+\.self_attn)\.o_proj", r"\1.linear_out"),
    (r"img_projection_up", "img_projection.0"), (r"img_projection_down", "img_projection.2"),
    (r"global_img_feature_extensor", "glb_GN"), (r"sub_img_feature_extensor", "sub_GN"),
    (r"up_proj_for_speech", "audio_projection.speech.0"), (r"down_proj_for_speech", "audio_projection.speech.2"),
    (r"up_proj_for_vision_speech", "audio_projection.vision.0"),
    (r"down_proj_for_vision_speech", "audio_projection.vision.2")]


def hub_to_native(name):
    """None for LoRA tensors (dropped), base_layer. stripped, renames per §7 'native' column."""
    for pat, rep in HUB_TO_NATIVE:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return None if "lora" in name else name.replace("base_layer.", "")


def hub_shapes(cfg, hub):
    """Hub tensor names/shapes, derived from the native model's state dict (meta device, no memory)."""
    with torch.device("meta"):
        sd = Phi4MultimodalForCausalLM(cfg).state_dict()
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":  # tied, absent from the hub shards (§7.1)
            continue
        m = re.fullmatch(r"(model\.layers\.\d+\.(?:%s))\.weight" % "|".join(map(re.escape, DECODER_LINEARS)), name)
        if m:  # PEFT layout (§3.4): base_layer + lora_{A,B}.{vision,speech}
            out[m[1] + ".base_layer.weight"] = tuple(t.shape)
            for mode in ("vision", "speech"):
                r = hub[mode + "_lora"]["r"]
                out[f"{m[1]}.lora_A.{mode}.weight"] = (r, t.shape[1])
                out[f"{m[1]}.lora_B.{mode}.weight"] = (t.shape[0], r)
            continue
        hub_name = name
        for pat, rep in NATIVE_TO_HUB:
            hub_name = re.sub(pat, rep, hub_name)
        assert hub_to_native(hub_name) == name, (name, hub_name)
        out[hub_name] = tuple(t.shape)
    return out


def init_tensor(name, shape):
    """Deterministic per-name random init (seeded by crc32 of the name), returned as bf16."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = name.rsplit(".", 2)[-2:]
    if name == "model.embed_tokens.weight" or leaf[-1] in ("glb_GN", "sub_GN", "probe", "global_mean"):
        t = z                                            # embeddings / separators ~ N(0,1)
    elif leaf[-1] == "global_invstd":
        t = 0.5 + torch.rand(shape, generator=g)         # positive scale
    elif len(shape) == 1 and "norm" in name and leaf[-1] == "weight":
        t = 1.0 + 0.1 * z                                # RMSNorm / LayerNorm gains
    elif "position_embedding" in name or "bias_values" in name:
        t = 0.5 * z                                      # learned tables
    elif "bias" in leaf[-1] or leaf[-1] in ("b1", "b2"):
        t = 0.1 * z
    else:                                                # linear/conv/LoRA A and B: N(0, 1/fan_in)
        t = z / math.sqrt(math.prod(shape[1:]))
        if name.endswith("base_layer.weight"):
            # decoder gain 2: with gain 1 the residual stream stays close to the input embedding and the tied head
            # greedily repeats the last token forever; gain 2 gives varied, well-separated greedy tokens
            t = 2.0 * t
    return t.to(torch.bfloat16)


def write_checkpoint(cfg, hub):
    tensors = {n: init_tensor(n, s) for n, s in sorted(hub_shapes(cfg, hub).items())}
    # two shards like the hub: embeddings + layers 0-1 first, the rest (layer 2, norm, towers) second
    first = lambda n: n == "model.embed_tokens.weight" or re.match(r"model\.layers\.[01]\.", n)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for i, fname in enumerate(files):
        part = {n: t for n, t in tensors.items() if bool(first(n)) == (i == 0)}
        save_file(part, str(TINY / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (TINY / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"checkpoint: {len(tensors)} tensors, {total} bytes")


# ----------------------------------------------------------------------------- tokenizer (§6.1)
def write_tokenizer():
    d = json.loads((SHARED / "o200k/gpt-4o-tokenizer.json").read_text())
    tcfg = json.loads((SHARED / "Phi-4-multimodal-instruct/tokenizer_config.json").read_text())
    added = []
    for sid, t in sorted(tcfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
        assert d["model"]["vocab"].get(t["content"], int(sid)) == int(sid)
        d["model"]["vocab"][t["content"]] = int(sid)  # pin the id (as 199999/200018 already are)
        added.append({"id": int(sid), "content": t["content"], **{k: t[k] for k in
                      ("single_word", "lstrip", "rstrip", "normalized", "special")}})
    d["added_tokens"] = added
    tok = Tokenizer.from_str(json.dumps(d))
    assert all(tok.token_to_id(a["content"]) == a["id"] for a in added)
    tok.save(str(TINY / "tokenizer.json"))  # tokenizers 0.23 writes merges as ["a","b"] pairs like the hub file
    for f in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "preprocessor_config.json", "processor_config.json"):
        shutil.copyfile(SHARED / "Phi-4-multimodal-instruct" / f, TINY / f)
    size = (TINY / "tokenizer.json").stat().st_size
    assert 10e6 < size < 16e6, size
    print(f"tokenizer.json: {size} bytes")


# ----------------------------------------------------------------------------- reference model
def load_reference(cfg, hub, mode):
    """Native model in f32 from the hub shards; `mode`'s LoRA merged: W' = W + (alpha/r) B A (§3.2)."""
    raw = {}
    for f in sorted(TINY.glob("model-*.safetensors")):
        raw.update({k: v.float() for k, v in load_file(str(f)).items()})
    sd = {hub_to_native(k): v for k, v in raw.items() if hub_to_native(k) is not None}
    if mode != "text":
        lcfg = hub[mode + "_lora"]
        s = lcfg["lora_alpha"] / lcfg["r"]
        for k in [k for k in raw if k.endswith(".base_layer.weight")]:
            p = k[: -len("base_layer.weight")]
            sd[hub_to_native(k)] = raw[k] + s * (raw[f"{p}lora_B.{mode}.weight"] @ raw[f"{p}lora_A.{mode}.weight"])
    model = Phi4MultimodalForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.config._attn_implementation == "eager"
    return model, sd


def check_rope(model):
    """§2.4: attention factor always applied; long factors only when max(position)+1 > 4096."""
    rot = model.model.rotary_emb
    assert abs(rot.attention_scaling - ATTN_FACTOR) < 1e-12 and abs(ATTN_FACTOR - 1.1902380714) < 1e-10
    x = torch.zeros(1, dtype=torch.float32)
    for n, fac in ((4096, SHORT), (4097, LONG), (100, SHORT)):
        cos, sin = rot(x, torch.arange(n)[None])
        inv = 1.0 / (torch.tensor(fac) * 10000.0 ** (torch.arange(0, 6, 2).float() / 6))
        ph = torch.arange(n).float()[:, None] * inv
        ph = torch.cat([ph, ph], -1)
        assert torch.allclose(cos[0], ph.cos() * ATTN_FACTOR, atol=1e-5), n
        assert torch.allclose(sin[0], ph.sin() * ATTN_FACTOR, atol=1e-5), n
    print(f"rope ok: attention_factor={rot.attention_scaling!r}, long factors iff seq_len > 4096")


def spec_last_logits(W, cfg, ids, embeds=None):
    """Independent re-implementation of §2 (plain torch) -> logits of the last position.
    `embeds` [L, hidden] replaces the token embeddings (image rows already merged, §6.4)."""
    L, nh, nkv, hd, rd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, 8, 6
    fac = torch.tensor(LONG if L > 4096 else SHORT)
    inv_freq = 1.0 / (fac * 10000.0 ** (torch.arange(0, rd, 2).float() / rd))  # f32, then phase = p * inv_freq
    ph = torch.arange(L).float()[:, None] * inv_freq
    cos, sin = torch.cat([ph, ph], -1).cos() * ATTN_FACTOR, torch.cat([ph, ph], -1).sin() * ATTN_FACTOR
    rms = lambda v, w: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    def rope(t):  # [heads, L, hd]; rotate-half within the first rd dims, pairing i with i + rd/2
        r, p = t[..., :rd], t[..., rd:]
        return torch.cat([r * cos + torch.cat([-r[..., rd // 2:], r[..., :rd // 2]], -1) * sin, p], -1)
    mask = torch.full((L, L), float("-inf")).triu(1)
    x = W["model.embed_tokens.weight"][torch.tensor(ids)] if embeds is None else embeds
    for i in range(cfg.num_hidden_layers):
        w = lambda n: W[f"model.layers.{i}.{n}.weight"]
        qkv = rms(x, w("input_layernorm")) @ w("self_attn.qkv_proj").T
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
        q, k, v = (t.view(L, -1, hd).transpose(0, 1) for t in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        x = x + a.transpose(0, 1).reshape(L, nh * hd) @ w("self_attn.o_proj").T
        gate, up = (rms(x, w("post_attention_layernorm")) @ w("mlp.gate_up_proj").T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w("mlp.down_proj").T
    return rms(x[-1], W["model.norm.weight"]) @ W["model.embed_tokens.weight"].T


@torch.no_grad()
def forward(model, ids, hidden=False):
    """Full forward, no cache (so lengths > 4096 use long factors for every position, §2.5)."""
    pre = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: pre.append(o[0] if isinstance(o, tuple) else o))
    out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=hidden, logits_to_keep=1)
    hook.remove()
    if not hidden:
        return out.logits[0, -1], None, None
    hs = torch.stack(out.hidden_states)[:, 0]
    # transformers replaces hidden_states[-1] by last_hidden_state, i.e. the output *after* model.norm
    assert torch.allclose(hs[-1], model.model.norm(pre[0][0]), atol=1e-6)
    return out.logits[0, -1], hs, pre[0][0]


def greedy(model, ids, n):
    """n greedy tokens, one full forward per step; records top-8 of each step's distribution."""
    seq, toks, top_ids, top_vals, margin = list(ids), [], [], [], float("inf")
    for step in range(n):
        logits, hs, pre = forward(model, seq, hidden=(step == 0))
        if step == 0:
            first = (logits.clone(), hs, pre)
        v, i = torch.topk(logits, 8)
        margin = min(margin, (v[0] - v[1]).item())
        assert i[0].item() == int(torch.argmax(logits))
        toks.append(i[0].item()); top_ids.append(i); top_vals.append(v); seq.append(i[0].item())
    return first, toks, torch.stack(top_ids), torch.stack(top_vals), margin, seq


# ----------------------------------------------------------------------------- texts (texts.py)
def long_prompt(tok, target=4090):
    """System+user chat of ~`target` tokens made of the sentences above (real text, numbered sections)."""
    parts, k = [], 0
    while len(" ".join(parts)) < 40000:
        for name, s in LANGS.items():
            k += 1
            parts.append(f"\n\n{k}. ({name.capitalize()}) {s}")
    text = "".join(parts)
    msgs = lambda t: [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "Please summarise the following notes." + t}]
    render = lambda t: tok.apply_chat_template(msgs(t), tokenize=False, add_generation_prompt=True)
    lo, hi = 0, len(text)  # largest prefix whose rendered prompt has <= target tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tok(render(text[:mid]))["input_ids"]) <= target else (lo, mid - 1)
    return msgs(text[:lo]), render(text[:lo])


# ----------------------------------------------------------------------------- main
def dump(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(2)  # fixed, so reruns reproduce the float outputs bit for bit
    TINY.mkdir(parents=True, exist_ok=True); EXP.mkdir(parents=True, exist_ok=True)
    hub = hub_config()
    (TINY / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    cfg = native_config(hub)
    write_checkpoint(cfg, hub)
    write_tokenizer()

    # Tokenizer. transformers 5.23 AutoTokenizer -> GPT2Tokenizer, whose __init__ rebuilds the pipeline with the
    # GPT-2 ByteLevel regex and drops tokenizer.json's o200k Split regex. TokenizersBackend keeps tokenizer.json
    # as is (= transformers 4.x GPT2TokenizerFast = tiktoken o200k). `ids` use the latter; differences are recorded.
    tok = TokenizersBackend.from_pretrained(str(TINY))
    # (config= is needed: on the hub-layout config.json, model_type "phi4mm", AutoTokenizer 5.23 raises)
    auto = AutoTokenizer.from_pretrained(str(TINY), config=cfg)
    raw = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    def enc(text):
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        rec = {"ids": ids}
        if auto(text)["input_ids"] != ids:
            rec["ids_transformers5_autotokenizer"] = auto(text)["input_ids"]
        return rec
    dump(EXP / "tokenize.json", [{"name": n, "text": t, **enc(t)} for n, t in {**LANGS, **EXTRA}.items()])
    chats = []
    for name, msgs, agp in CHATS:
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        assert prompt == auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        chats.append({"name": name, "messages": msgs, "add_generation_prompt": agp, "prompt": prompt, **enc(prompt)})
    dump(EXP / "chat.json", chats)
    n_diff = sum("ids_transformers5_autotokenizer" in r for r in json.loads((EXP / "tokenize.json").read_text()))
    print(f"tokenize: AutoTokenizer(5.23) differs from tokenizer.json on {n_diff} texts; BOS added: "
          f"{any(r['ids'][:1] == [199999] for r in chats)}")

    # Model cases (§2, §3): prompt hidden states/logits + greedy steps with full forwards.
    chat = {c["name"]: c for c in chats}
    cross_msgs, cross_prompt = long_prompt(tok)
    chat["crossing"] = {"messages": cross_msgs, "prompt": cross_prompt, "ids": tok(cross_prompt)["input_ids"]}
    assert 4086 <= len(chat["crossing"]["ids"]) <= 4094, len(chat["crossing"]["ids"])
    cases = [("text_base", "text", "system_user", 16), ("text_vision_lora", "vision", "system_user", 16),
             ("text_speech_lora", "speech", "system_user", 16), ("multi_turn", "text", "multi_turn", 16),
             ("crossing", "text", "crossing", 12)]
    models, meta, greedy_by_case = {}, [], {}
    for name, mode, chat_name, n in cases:
        ids = chat[chat_name]["ids"]
        if mode not in models:
            models[mode] = load_reference(cfg, hub, mode)
            check_rope(models[mode][0])
        model, W = models[mode]
        (logits, hs, pre), toks, top_ids, top_vals, margin, seq = greedy(model, ids, n)
        ref = spec_last_logits(W, cfg, ids)  # independent check of the spec against transformers
        assert torch.allclose(ref, logits, atol=2e-4, rtol=1e-4), (ref - logits).abs().max()
        out = {"input_ids": torch.tensor(ids), "logits_last": logits, "greedy": torch.tensor(toks),
               "step_top_ids": top_ids, "step_top_logits": top_vals}
        if name == "crossing":  # tails only; plus the last step's full forward (length > 4096, long factors)
            out["hidden_states_tail"], out["last_layer_pre_norm_tail"] = hs[:, -4:], pre[-4:]
            l2, hs2, pre2 = forward(model, seq[:-1], hidden=True)
            out["long_hidden_states_tail"], out["long_last_layer_pre_norm_tail"] = hs2[:, -4:], pre2[-4:]
            assert torch.equal(torch.topk(l2, 8).values, top_vals[-1])
            assert torch.allclose(spec_last_logits(W, cfg, seq[:-1]), l2, atol=2e-4, rtol=1e-4)
        else:
            out["hidden_states"], out["last_layer_pre_norm"] = hs, pre
        save_file({k: v.contiguous() for k, v in out.items()}, str(EXP / f"{name}.safetensors"))
        eos = [i for i, t in enumerate(toks) if t in EOS_IDS]
        greedy_by_case[name] = toks
        meta.append({"name": name, "mode": mode, "file": f"{name}.safetensors", "prompt_len": len(ids),
                     "max_new_tokens": n, "min_margin": margin, "eos_steps": eos,
                     # first greedy step whose forward sees > 4096 tokens (long factors), if any
                     "long_from_step": (4097 - len(ids)) if len(ids) + n - 1 > 4096 else None,
                     "messages": chat[chat_name]["messages"], "add_generation_prompt": True,
                     "prompt": chat[chat_name]["prompt"]})
        print(f"{name:17s} mode={mode:6s} L={len(ids):5d} min_margin={margin:.4f} eos_at={eos} greedy={toks}")
        assert margin > 1e-3, f"{name}: margin {margin} too small; change SEED"
    dump(EXP / "cases.json", meta)
    for m in ("text_vision_lora", "text_speech_lora"):
        diff = sum(a != b for a, b in zip(greedy_by_case["text_base"], greedy_by_case[m]))
        print(f"{m}: {diff}/16 greedy tokens differ from text_base")
        assert diff > 0


if __name__ == "__main__":
    main()
