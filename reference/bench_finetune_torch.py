#!/usr/bin/env python3
"""CPU baseline for `phi4mm finetune`: LoRA training updates with PyTorch + PEFT on a hub-layout checkpoint.

    python reference/bench_finetune_torch.py MODEL_DIR --data clip.jsonl [--mode speech|vision] [--updates 3] [--threads 2]

The official speech recipe's step (hub `sample_finetune_speech.py`) on one example: the native
Phi4MultimodalForCausalLM in bf16 (loaded as reference/bench_transformers.py does: one copy, no mmap), the hub's
mode's LoRA (speech by default) put into a PEFT adapter (r / alpha from config.json, dropout 0 so both engines do the same step),
only its A/B trainable, gradient checkpointing (use_reentrant=False, as the recipe), AdamW (betas 0.9/0.95,
eps 1e-7, weight decay 0.01, lr 4e-5), clip_grad_norm_ 1.0. The data line is the first of --data (phi4mm's
format: {"audio" | "image", "target", "instruction"?}); prompt "<|audio_1|>Transcribe the audio clip into text."
(speech) or "<|image_1|>" + the instruction (vision, image through the original processor) through the chat template, target answer<|end|><|endoftext|>, labels -100 on the prompt. Prints ONE JSON line:
{"engine": "pytorch+peft", "updates": [{"loss", "seconds"}...], "peak_rss_bytes", "load_s", "torch", "peft"}.
"""
import argparse, json, os, resource, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_transformers as bt  # noqa: E402  (config, weight loading without mmap)
import make_audio as ma           # noqa: E402  (the original feature extractor, token count)

TARGET = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def lora_from_hub(model, model_dir, mode):
    """Copies the hub's lora_{A,B}.{mode} tensors into PEFT's `default` adapter; returns the trainable params."""
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    want = lambda k: f".lora_A.{mode}." in k or f".lora_B.{mode}." in k
    hub = {}
    for sh in shards:
        hub.update(dict(bt.read_safetensors(os.path.join(model_dir, sh), want, torch.bfloat16)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in params.items():
        with torch.no_grad():
            p.copy_(hub[n.removeprefix("base_model.model.").replace(".default.weight", f".{mode}.weight")])
    assert len(params) == len(hub), (len(params), len(hub))
    return list(params.values())


def inputs(mode, ex, base, tok):
    """Expanded prompt ids and the model's media arguments for one example."""
    if mode == "speech":
        feats = ma.original_features(*ma.load_audio(os.path.join(base, ex["audio"])))[0]
        n_aud = ma.num_tokens(len(feats))
        content = ex.get("instruction") or "<|audio_1|>Transcribe the audio clip into text."
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return ma.expand(tok, prompt, [], [n_aud]), {"audio_input_features": torch.from_numpy(feats)[None],
                                                     "audio_embed_sizes": torch.tensor([n_aud]), "audio_attention_mask": None}
    from PIL import Image
    import make_vision as mv  # the original processor's preprocessing, placeholder expansion, batching
    pre = mv.preprocess(Image.open(os.path.join(base, ex["image"])))
    content = "<|image_1|>" + ex["instruction"]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return mv.expand(tok, prompt, [pre["num_img_tokens"]]), mv.batch([pre])  # f32 pixels; the embedding casts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["speech", "vision"], default="speech")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import TokenizersBackend
    import peft
    t0 = time.time()
    model, cfg = bt.load_model(a.model_dir, torch.bfloat16, decoder_only=False)
    with open(os.path.join(a.model_dir, "config.json")) as f:
        lcfg = json.load(f)[a.mode + "_lora"]
    model = get_peft_model(model, LoraConfig(r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], lora_dropout=0.0,
                                             target_modules=TARGET, bias="none"))
    params = lora_from_hub(model, a.model_dir, a.mode)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    load_s = time.time() - t0
    ex = json.loads(open(a.data).readline())
    base = os.path.dirname(os.path.abspath(a.data))
    tok = TokenizersBackend.from_pretrained(a.model_dir)
    ids, media = inputs(a.mode, ex, base, tok)
    target = tok(ex["target"] + "<|end|><|endoftext|>")["input_ids"]
    input_ids = torch.tensor([ids + target])
    labels = torch.full_like(input_ids, -100)
    labels[0, len(ids):] = torch.tensor(target)
    opt = torch.optim.AdamW(params, lr=4e-5, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01)
    updates = []
    for _ in range(a.updates):
        ts = time.perf_counter()
        loss = model(input_ids=input_ids, labels=labels, use_cache=False, **media).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates.append({"loss": loss.item(), "seconds": time.perf_counter() - ts})
        print(f"update {len(updates)}: {updates[-1]}", file=sys.stderr, flush=True)
    print(json.dumps({"engine": "pytorch+peft", "updates": updates, "mode": a.mode, "prompt_tokens": len(ids), "target_tokens": len(target),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "load_s": load_s,
                      "torch": torch.__version__, "peft": peft.__version__}))


if __name__ == "__main__":
    main()
