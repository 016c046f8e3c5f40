#!/usr/bin/env python3
"""Fine-tuning fixtures: loss, LoRA gradients and AdamW steps of the tiny checkpoint with PyTorch + PEFT.

Run from the repository root, after make_tiny.py, make_vision.py and make_audio.py:
    python reference/make_finetune.py
Writes fixtures/expected/finetune/{speech,vision}.safetensors and cases.json.

The model is transformers' native Phi4MultimodalForCausalLM in float32 (eager) with the BASE weights, and the
mode's adapter injected by PEFT (`get_peft_model`, r/alpha of the tiny config, dropout 0) with the hub's lora_A/B
copied in: the official recipe's trainable set (only the mode's LoRA pairs). Each case is a global batch of
examples, each run alone (no padding); loss = sum over all target tokens of -log p / number of target tokens
(labels -100 on the prompt; the target is `answer<|end|><|endoftext|>` as the official scripts build it).
Then 3 updates of torch.optim.AdamW (betas 0.9/0.95, eps 1e-7, weight decay 0.01) with
torch.nn.utils.clip_grad_norm_ and transformers' get_linear_schedule_with_warmup (1 warmup step of 3), the batch
recomputed after every update; the clip is set to half the first gradient norm so that clipping is exercised.
"""
import json, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny as mt    # noqa: E402
import make_audio as ma   # noqa: E402
import make_vision as mv  # noqa: E402

OUT = Path("fixtures/expected/finetune")
TARGET = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
LR, STEPS, WARMUP = 1e-2, 3, 1
CASES = {  # mode -> examples (audio files, image files, user content, answer)
    "speech": [(["speech_1s_16k.wav"], [], "<|audio_1|>Transcribe the audio clip into text.", "What colour is it?"),
               (["speech_10s_16k.wav"], [], "<|audio_1|>Translate the audio to French.",
                "Le temps était calme ce matin.")],
    "vision": [([], ["square_448x448.png"], "<|image_1|>What is in the picture?", "A square."),
               ([], ["wide_500x300.png"], "<|image_1|>Answer with the option's letter.\nA. red\nB. blue", "B")],
}


def peft_model(cfg, hub, mode):
    """Native f32 model with the base weights, the mode's LoRA injected by PEFT and set to the hub's A/B."""
    model, _ = mt.load_reference(cfg, hub, "text")
    lcfg = hub[mode + "_lora"]
    model = get_peft_model(model, LoraConfig(r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], lora_dropout=0.0,
                                             target_modules=TARGET, bias="none"))
    raw = {}
    for f in sorted(mt.TINY.glob("model-*.safetensors")):
        raw.update({k: v.float() for k, v in mt.load_file(str(f)).items()})
    params = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight -> hub name
        hub_name = name.removeprefix("base_model.model.").replace(".default.weight", f".{mode}.weight")
        with torch.no_grad():
            p.copy_(raw[hub_name])
        params[hub_name] = p
    assert len(params) == 4 * 2 * cfg.num_hidden_layers, len(params)
    model.eval()  # dropout is 0 anyway; eval keeps the towers deterministic
    return model, params


def example(tok, auds, imgs, content, answer):
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    feats = [ma.original_features(*ma.load_audio(ma.AUD / f))[0] for f in auds]
    pres = [mv.preprocess(Image.open(mv.IMG / f)) for f in imgs]
    ids = ma.expand(tok, prompt, [p["num_img_tokens"] for p in pres], [ma.num_tokens(len(x)) for x in feats])
    target = tok(answer + "<|end|><|endoftext|>")["input_ids"]
    media = {}
    if feats:
        media = {"audio_input_features": torch.from_numpy(feats[0])[None], "audio_embed_sizes":
                 torch.tensor([ma.num_tokens(len(feats[0]))]), "audio_attention_mask": None}
    if pres:
        media.update(mv.batch(pres))
    return {"prompt": prompt, "ids": ids, "target": target, "media": media}


def nll_sum(model, ex):
    """Sum of -log p of the target tokens (the rows before each target token predict it)."""
    ids = torch.tensor([ex["ids"] + ex["target"]])
    logits = model(input_ids=ids, use_cache=False, **ex["media"]).logits[0]
    p, k = len(ex["ids"]), len(ex["target"])
    return F.cross_entropy(logits[p - 1: p - 1 + k], torch.tensor(ex["target"]), reduction="sum")


def check_labels(model, ex):
    """Our loss convention is transformers' own (labels -100 on the prompt, shifted CE, mean over targets)."""
    ids = torch.tensor([ex["ids"] + ex["target"]])
    labels = torch.full_like(ids, -100)
    labels[0, len(ex["ids"]):] = torch.tensor(ex["target"])
    with torch.no_grad():
        hf = model(input_ids=ids, labels=labels, use_cache=False, **ex["media"]).loss.item()
        ours = nll_sum(model, ex).item() / len(ex["target"])
    return hf, ours


def batch_grads(model, params, exs):
    model.zero_grad(set_to_none=True)
    tokens = sum(len(e["target"]) for e in exs)
    loss = 0.0
    for e in exs:
        l = nll_sum(model, e) / tokens
        l.backward()
        loss += l.item()
    return loss, {k: p.grad.detach().clone() for k, p in params.items()}


def run_case(cfg, hub, tok, mode):
    model, params = peft_model(cfg, hub, mode)
    exs = [example(tok, *c) for c in CASES[mode]]
    merged, _ = mt.load_reference(cfg, hub, mode)
    with torch.no_grad():  # PEFT unmerged == the merged reference the parity fixtures use
        d = max((nll_sum(model, e) - nll_sum(merged, e)).abs().item() for e in exs)
    assert d < 1e-4, d
    loss, grads = batch_grads(model, params, exs)
    norm0 = torch.norm(torch.stack([g.norm() for g in grads.values()])).item()
    clip = norm0 / 2
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, STEPS)
    steps = []
    for s in range(STEPS):
        l, _ = batch_grads(model, params, exs)
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item()
        steps.append({"loss": l, "grad_norm": norm, "lr": sched.get_last_lr()[0]})
        opt.step()
        sched.step()
    final = {f"after.{k}": p.detach().clone() for k, p in params.items()}
    save_file({**{f"grad.{k}": g for k, g in grads.items()}, **final}, str(OUT / f"{mode}.safetensors"))
    hf, ours = check_labels(merged, exs[0])
    print(f"{mode}: loss {loss:.6f} |g| {norm0:.4f} clip {clip:.4f} steps {steps} hf-labels {hf:.6f} vs ours {ours:.6f}")
    return {"mode": mode, "file": f"{mode}.safetensors", "loss": loss, "grad_norm": norm0, "max_grad_norm": clip,
            "lr": LR, "updates": STEPS, "warmup_steps": WARMUP, "steps": steps, "betas": [0.9, 0.95], "eps": 1e-7,
            "weight_decay": 0.01,
            "examples": [{"audio": c[0], "image": c[1], "instruction": c[2], "target": c[3],
                          "prompt_len": len(e["ids"]), "target_ids": e["target"]} for c, e in zip(CASES[mode], exs)]}


def main():
    torch.manual_seed(mt.SEED)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    hub = mt.hub_config()
    cfg = mt.native_config(hub)
    tok = mt.TokenizersBackend.from_pretrained(str(mt.TINY))
    cases = [run_case(cfg, hub, tok, m) for m in CASES]
    import peft, transformers
    mt.dump(OUT / "cases.json", {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__, "cases": cases})


if __name__ == "__main__":
    main()
