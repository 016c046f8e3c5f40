#!/usr/bin/env python3
"""Vision-path fixtures: synthetic test images + reference values of the tiny checkpoint.

Run from the repository root, after make_tiny.py:  python reference/make_vision.py
Writes fixtures/images/ (test images) and fixtures/expected/vision/ (preprocessing results, tower/pooled/projected
features, decoder cases). Model values come from transformers' native Phi4MultimodalForCausalLM (f32, eager, vision
LoRA merged) and are checked against a plain-torch implementation of spec §4.2-4.4 (shared/design/architecture.md).
Preprocessing follows the ORIGINAL hub processor (§4.1): PIL bilinear resize of the PIL image, not the native
transformers image processor (torchvision tensor path), whose differences are only measured and printed.
"""
import math, re, sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, features
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny as mt  # noqa: E402  (model building, LoRA merge, greedy margins, decoder spec check)

IMG, OUT = Path("fixtures/images"), Path("fixtures/expected/vision")
S, P, M, MAX_NUM = 448, 14, 32, 36          # crop, patch, mask grid per crop, dynamic_hd (§4.1)
IMAGE_ID, N_STEPS = 200010, 12
# file -> (width, height, seed, nearest-upscale factor of the generated content)
IMAGES = {"square_448x448.png": (448, 448, 11, 1), "hd_1280x720.png": (1280, 720, 12, 1),
          "wide_500x300.png": (500, 300, 13, 1), "tall_300x1200.png": (300, 1200, 14, 1),
          "tiny_20x20.png": (20, 20, 15, 1), "big_4000x3000.png": (4000, 3000, 16, 4),
          "gray_640x480.png": (640, 480, 17, 1), "rgba_512x384.png": (512, 384, 18, 1),
          "hd_1280x720.jpg": (1280, 720, 12, 1),
          "trunc_55x55.png": (55, 55, 19, 1)}  # int(55 * (448/55)) = 447: resized 447x448, 1 white column
THUMB = {"hd_1280x720", "tall_300x1200"}   # also store global_thumb (1×1 grids: the thumbnail is the canvas)
TOWER = {"hd_1280x720", "wide_500x300"}                                   # also tower_out + pooled_sequence
CASES = [  # (name, messages, image files in binding order)
    ("one_image", [{"role": "user", "content": "<|image_1|>What is shown in this image?"}], ["hd_1280x720.png"]),
    ("two_images_one_turn", [{"role": "user", "content": "<|image_1|><|image_2|>Compare these two pictures."}],
     ["wide_500x300.png", "tall_300x1200.png"]),
    ("images_two_turns", [{"role": "user", "content": "<|image_1|>Describe this picture."},
                          {"role": "assistant", "content": "A few colourful shapes in front of a smooth sky."},
                          {"role": "user", "content": "<|image_2|>And this one, in grey?"}],
     ["square_448x448.png", "gray_640x480.png"])]


# ----------------------------------------------------------------------------- test images
def synth(w, h, seed, up=1):
    """Photo-like uint8 RGB [h, w, 3]: gradient sky with soft waves, wavy horizon, shaded shapes, thin lines,
    grain on the ground only (keeps the PNGs small). `up` > 1: made at 1/up size, then nearest-upscaled."""
    rng = np.random.default_rng(seed)
    w0, h0 = -(-w // up), -(-h // up)
    y, x = np.mgrid[0:h0, 0:w0].astype(np.float64)
    u, v = x / max(w0, h0), y / max(w0, h0)
    c = rng.uniform(40, 215, (4, 3))
    img = c[0] + (c[1] - c[0]) * (x / w0)[..., None] + (c[2] - c[0]) * (y / h0)[..., None]
    for _ in range(3):
        f, ph = rng.uniform(0.5, 3, 2), rng.uniform(0, 2 * math.pi)
        img += rng.uniform(4, 12) * np.sin(2 * math.pi * (f[0] * u + f[1] * v) + ph)[..., None] * rng.uniform(0.3, 1, 3)
    ground = y > h0 * rng.uniform(0.55, 0.7) + 0.05 * h0 * np.sin(4 * math.pi * u)
    img = np.where(ground[..., None], c[3] * (0.7 + 0.3 * y / h0)[..., None], img)
    for _ in range(int(rng.integers(5, 9))):
        kind, cx, cy = rng.integers(0, 3), rng.uniform(0, w0), rng.uniform(0, h0)
        rx, ry = rng.uniform(0.04, 0.18, 2) * max(w0, h0)
        if kind == 0:
            m = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        elif kind == 1:
            a = rng.uniform(0, math.pi)
            xr, yr = (x - cx) * math.cos(a) + (y - cy) * math.sin(a), (y - cy) * math.cos(a) - (x - cx) * math.sin(a)
            m = (np.abs(xr) < rx) & (np.abs(yr) < ry / 2)
        else:
            m = np.abs(x - cx) / rx + np.abs(y - cy) / ry < 1
        shade = 0.75 + 0.25 * np.clip(1 - ((x - cx + rx / 2) ** 2 + (y - cy + ry / 2) ** 2) / (rx * rx + ry * ry), 0, 1)
        img = np.where(m[..., None], rng.uniform(0, 255, 3) * shade[..., None], img)
    for _ in range(3):  # thin dark lines (1-2 px): fine detail for the resamplers
        a, b, cc = rng.normal(size=3)
        line = np.abs(a * x + b * y + cc * max(w0, h0) * 0.3) / math.hypot(a, b) < rng.uniform(0.5, 1.2)
        img = np.where(line[..., None], img * 0.3, img)
    img = img + (rng.normal(0, 3.0, (h0, w0)) * ground)[..., None]
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out.repeat(up, 0).repeat(up, 1)[:h, :w] if up > 1 else out


def write_images():
    IMG.mkdir(parents=True, exist_ok=True)
    for f, (w, h, seed, up) in IMAGES.items():
        rgb = synth(w, h, seed, up)
        if f.startswith("gray"):
            im = Image.fromarray(rgb).convert("L")
        elif f.startswith("rgba"):  # alpha: horizontal ramp 0..255 times a vertical wave, fully transparent corner
            y, x = np.mgrid[0:h, 0:w]
            a = (255 * (x / (w - 1)) * (0.6 + 0.4 * np.cos(y / h * 6 * math.pi))).round()
            a[: h // 4, : w // 4] = 0
            im = Image.fromarray(np.dstack([rgb, a.astype(np.uint8)]), "RGBA")
        else:
            im = Image.fromarray(rgb)
        if f.endswith(".jpg"):  # baseline JPEG, 4:2:0 chroma subsampling
            im.save(IMG / f, "JPEG", quality=90, subsampling=2, optimize=False, progressive=False)
        else:
            im.save(IMG / f, "PNG", optimize=True)


# ----------------------------------------------------------------------------- preprocessing (§4.1, original)
def grid_choice(W, H, max_num=MAX_NUM):
    """(gw, gh) = crop columns, rows: ceil grid if <= max_num crops, else the original aspect-ratio search."""
    wc, hc = math.ceil(W / S), math.ceil(H / S)
    if wc * hc <= max_num:
        return wc, hc
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        d = abs(W / H - i / j)
        if d < best_diff:
            best, best_diff = (i, j), d
        elif d == best_diff and W * H > 0.5 * S * S * i * j:
            best = (i, j)
    return best


def layout(W, H):
    """Grid (gw, gh), resized size, padding, patch mask [32gh, 32gw], (Uh, Uw) and token count for a W x H image."""
    gw, gh = grid_choice(W, H)
    TW, TH = S * gw, S * gh
    rw, rh = TW / W, TH / H
    nw, nh = (TW, int(H * rw)) if rw < rh else (int(W * rh), TH)        # int() truncation of the f64 product
    pw, ph = TW - nw, TH - nh
    assert min(nw, nh) >= 10, "the aspect ratio is very extreme"
    mask = torch.ones(M * gh, M * gw, dtype=torch.uint8)
    if pw >= P:
        mask[:, -(pw // P):] = 0
    if ph >= P:
        mask[-(ph // P):, :] = 0
    cmask = mask.reshape(gh, M, gw, M).transpose(1, 2).reshape(-1, M, M)  # row-major crop masks
    # token count: §4.5 closed form and the processor's own expression (tiled even-subsampled crop masks)
    uh, uw = math.ceil(int(mask[:, 0].sum()) / 2), math.ceil(int(mask[0].sum()) / 2)
    ds = cmask[:, ::2, ::2].reshape(gh, gw, M // 2, M // 2).transpose(1, 2).reshape(gh * M // 2, gw * M // 2)
    n_tok = 273 + uh * (uw + 1)
    assert n_tok == 256 + 1 + int(ds.sum()) + int(ds[:, 0].sum()) + 16
    return {"grid": (gw, gh), "resized": (nw, nh), "pad": (pw, ph), "image_size": (TH, TW), "cmask": cmask,
            "uhw": (uh, uw), "num_img_tokens": n_tok}


def preprocess(img):
    """PIL image -> layout + uint8 canvas, pixel values [1+n,3,448,448] (global thumbnail first), masks [1+n,32,32]."""
    img = img.convert("RGB")                                   # alpha dropped (not composited), L replicated
    lay = layout(*img.size)
    (gw, gh), (nw, nh), (TH, TW) = lay["grid"], lay["resized"], lay["image_size"]
    canvas = Image.new("RGB", (TW, TH), (255, 255, 255))      # white right/bottom padding
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (0, 0))
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float().div(255)   # = torchvision to_tensor
    x = (x - 0.5) / 0.5                                                         # = normalize(0.5, 0.5)
    thumb = F.interpolate(x[None], size=(S, S), mode="bicubic", align_corners=False)[0]
    crops = x.reshape(3, gh, S, gw, S).permute(1, 3, 0, 2, 4).reshape(-1, 3, S, S)   # row-major tiles
    return {**lay, "canvas": canvas, "normalized": x, "pixel_values": torch.cat([thumb[None], crops]),
            "mask": torch.cat([torch.ones(1, M, M, dtype=torch.uint8), lay["cmask"]])}


def bicubic_np(x, out):
    """Independent numpy check of the thumbnail: separable cubic convolution a=-0.75, align_corners=False,
    source index (dst+0.5)*in/out-0.5, taps clamped to the border, no antialias."""
    def axis(a, n_out, ax):
        n_in = a.shape[ax]
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        i0 = np.floor(src).astype(int)
        t = src - i0
        k = lambda d: np.where(d <= 1, (1.25 * d - 2.25) * d * d + 1, ((-0.75 * d + 3.75) * d - 6) * d + 3)
        ws = [k(t + 1), k(t), k(1 - t), k(2 - t)]
        res = 0
        for j, wj in enumerate(ws):
            idx = np.clip(i0 - 1 + j, 0, n_in - 1)
            sh = [1] * a.ndim
            sh[ax] = n_out
            res = res + np.take(a, idx, axis=ax) * wj.reshape(sh)
        return res
    return axis(axis(x.astype(np.float64), out, 1), out, 2)


def check_preprocess(img, pre):
    """torchvision (what the original processor calls) gives the same canvas; numpy bicubic = thumbnail;
    differences of the native transformers image processor are only measured."""
    import torchvision.transforms.functional as TF
    from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import Phi4MultimodalImageProcessor
    rgb = img.convert("RGB")
    (nw, nh), (pw, ph) = pre["resized"], pre["pad"]
    tv = TF.pad(TF.resize(rgb, [nh, nw]), [0, 0, pw, ph], fill=[255, 255, 255])
    assert np.array_equal(np.array(tv), np.array(pre["canvas"])), "torchvision PIL path differs"
    assert torch.equal(TF.normalize(TF.to_tensor(tv), [0.5] * 3, [0.5] * 3), pre["normalized"])
    d_bic = float(np.abs(bicubic_np(pre["normalized"].numpy(), S) - pre["pixel_values"][0].numpy()).max())
    assert d_bic < 1e-5, d_bic
    if pre["grid"] == (1, 1):  # 448 -> 448: torch's bicubic is an exact copy (weights 0, 1, 0, 0)
        assert torch.equal(pre["pixel_values"][0], pre["normalized"])
    nat = Phi4MultimodalImageProcessor()(rgb, return_tensors="pt")
    assert nat["num_img_tokens"].tolist() == [pre["num_img_tokens"]] and torch.equal(nat["image_attention_mask"][0].to(torch.uint8), pre["mask"])
    d = (nat["image_pixel_values"][0] - pre["pixel_values"]).abs()
    lev = (d[1:] * 127.5).round()   # local crops: difference in uint8 levels
    return d_bic, {"native_proc_levels_differ": f"{int((lev > 0).sum())}/{lev.numel()}", "max_levels": int(lev.max()),
                   "thumb_max_abs": float(d[0].max())}


# ----------------------------------------------------------------------------- spec implementation (§4.2-4.4)
def spec_image(W, vcfg, pv, mask, grid, uhw, flash=False):
    """Plain-torch SigLIP (eager key masking, layers 0..L-2), 2x2 avg pool, sub_glb assembly, projector.
    flash=True: the original's flash-attention varlen path instead (padded queries' attention output = 0)."""
    p = "model.embed_tokens_extend.image_embed."
    t = lambda k: W[p + "img_processor." + k]
    n, d, nh = pv.shape[0], vcfg.hidden_size, vcfg.num_attention_heads
    hd = d // nh
    x = F.conv2d(pv, t("embeddings.patch_embedding.weight"), t("embeddings.patch_embedding.bias"), stride=P)
    x = x.flatten(2).transpose(1, 2)                                              # [n, 1024, d], index r*32+c
    valid = mask.bool()
    rows, cols = valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)                     # nh, nw per crop
    r = torch.arange(M)
    pos = (M * r[None, :, None] // rows[:, None, None]) * M + M * r[None, None, :] // cols[:, None, None]
    pos = torch.where(valid, pos, 0).reshape(n, -1)                               # padding patches: id 0
    x = x + t("embeddings.position_embedding.weight")[pos]
    bias = torch.zeros(n, 1, 1, M * M).masked_fill(~valid.reshape(n, 1, 1, -1), float("-inf"))  # keys only
    ln = lambda v, k: F.layer_norm(v, (d,), t(k + ".weight"), t(k + ".bias"), vcfg.layer_norm_eps)
    lin = lambda v, k: v @ t(k + ".weight").T + t(k + ".bias")
    for li in range(vcfg.num_hidden_layers - 1):                                 # hidden_states[-2]
        k = f"encoder.layers.{li}."
        h = ln(x, k + "layer_norm1")
        q, kk, v = (lin(h, k + f"self_attn.{s}_proj").view(n, -1, nh, hd).transpose(1, 2) for s in "qkv")
        a = torch.softmax(q @ kk.transpose(-1, -2) * hd ** -0.5 + bias, -1) @ v
        if flash:
            a = a * valid.reshape(n, 1, -1, 1)
        x = x + lin(a.transpose(1, 2).reshape(n, -1, d), k + "self_attn.out_proj")
        x = x + lin(F.gelu(lin(ln(x, k + "layer_norm2"), k + "mlp.fc1"), approximate="tanh"), k + "mlp.fc2")
    tower = x
    pooled = F.avg_pool2d(x.transpose(1, 2).reshape(n, d, M, M), 2).permute(0, 2, 3, 1)   # [n, 16, 16, d]
    (gw, gh), (uh, uw), g = grid, uhw, M // 2
    sub = W[p + "sub_img_feature_extensor"].reshape(1, 1, d)
    glb = W[p + "global_img_feature_extensor"].reshape(1, d)
    local = pooled[1:1 + gw * gh].reshape(gh, gw, g, g, d).permute(0, 2, 1, 3, 4).reshape(gh * g, gw * g, d)
    local = torch.cat([local[:uh, :uw], sub.expand(uh, 1, d)], 1).reshape(-1, d)
    glob = torch.cat([pooled[0], sub.expand(g, 1, d)], 1).reshape(-1, d)
    seq = torch.cat([local, glb, glob])
    up = seq @ W[p + "img_projection_up.weight"].T + W[p + "img_projection_up.bias"]
    feats = F.gelu(up) @ W[p + "img_projection_down.weight"].T + W[p + "img_projection_down.bias"]   # exact erf
    return tower, seq, feats


# ----------------------------------------------------------------------------- native model
def batch(pres):
    """Processor-style batch: crops padded to the max count with zero images / all-one masks."""
    n = max(p["pixel_values"].shape[0] for p in pres)
    pv = torch.zeros(len(pres), n, 3, S, S)
    am = torch.ones(len(pres), n, M, M)
    for i, p in enumerate(pres):
        pv[i, : p["pixel_values"].shape[0]] = p["pixel_values"]
        am[i, : p["mask"].shape[0]] = p["mask"].float()
    return {"image_pixel_values": pv, "image_attention_mask": am,
            "image_sizes": torch.tensor([p["image_size"] for p in pres], dtype=torch.long)}


@torch.no_grad()
def native_image(model, pre):
    """Run the whole native model on [image placeholders only]; hooks capture tower output (hidden_states[-2]),
    the assembled sequence (projector input), the projected features and the decoder's input rows."""
    ie = model.model.embed_tokens_extend.image_embed
    got = {}

    def keep(k, v):  # hooks must return None: a returned value would replace the module's input/output
        got.setdefault(k, v)
    hooks = [ie.img_processor.encoder.layers[-2].register_forward_hook(lambda m, i, o: keep("tower", o)),
             ie.img_projection_up.register_forward_pre_hook(lambda m, i: keep("seq", i[0][0])),
             ie.img_projection_down.register_forward_hook(lambda m, i, o: keep("feats", o[0])),
             model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: keep("emb", (a[0] if a else kw["hidden_states"])[0]),
                                                             with_kwargs=True)]
    ids = torch.full((1, pre["num_img_tokens"]), IMAGE_ID)
    model(input_ids=ids, use_cache=False, logits_to_keep=1, **batch([pre]))
    for h in hooks:
        h.remove()
    assert torch.equal(got["emb"], got["feats"])                                # overwritten, in order
    return got["tower"], got["seq"], got["feats"]


@torch.no_grad()
def greedy_mm(model, ids, images, n):
    """make_tiny.greedy with image inputs: full forward per step (images re-encoded), top-8 per step."""
    seq, toks, top_ids, top_vals, margin = list(ids), [], [], [], float("inf")
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1, **images).logits[0, -1]
        if not toks:
            first = logits.clone()
        v, i = torch.topk(logits, 8)
        margin = min(margin, (v[0] - v[1]).item())
        toks.append(i[0].item()); top_ids.append(i); top_vals.append(v); seq.append(i[0].item())
    return first, toks, torch.stack(top_ids), torch.stack(top_vals), margin


def expand(tok, prompt, n_tokens):
    """§6.3: <|image_K|> -> <|endoftext10|> (K ignored), tokenize, i-th placeholder -> n_tokens[i] copies."""
    ids = tok(re.sub(r"<\|image_\d+\|>", "<|endoftext10|>", prompt))["input_ids"]
    assert ids.count(IMAGE_ID) == len(n_tokens)
    out, k = [], 0
    for t in ids:
        out += [t] * (n_tokens[k] if t == IMAGE_ID else 1)
        k += t == IMAGE_ID
    return out


# ----------------------------------------------------------------------------- checks, fixtures, cases
def check_positions_and_counts(ie):
    """Native position ids (bucketize of fractional coords) == §4.2 integer formula for every valid count;
    token counts of the spec's examples (§4.6), incl. the 36-crop cap (3000x4000, 4000x300, 8000x1000)."""
    emb, r, got = ie.img_processor.embeddings, torch.arange(M), []
    hook = emb.position_embedding.register_forward_hook(lambda m, i, o: got.append(i[0][0]))
    for a in range(1, M + 1):
        for b in range(1, M + 1):
            msk = torch.zeros(1, M, M, dtype=torch.bool)
            msk[0, :a, :b] = True
            emb(torch.zeros(1, 3, S, S), msk)
            assert torch.equal(got.pop(), torch.where(msk[0], (M * r[:, None] // a) * M + M * r[None] // b, 0).flatten())
    hook.remove()
    for (w, h), n in {(1280, 720): 1596, (1344, 896): 1841, (448, 448): 545, (500, 300): 721, (640, 480): 1065,
                      (1920, 1080): 3918, (3000, 4000): 3409, (4000, 300): 1868, (8000, 1000): 8497}.items():
        assert layout(w, h)["num_img_tokens"] == n, (w, h, layout(w, h)["num_img_tokens"])
    assert layout(3000, 4000)["grid"] == (3, 4) and layout(8000, 1000)["grid"] == (16, 2)


LAYOUT_SIZES = [(1280, 720), (1344, 896), (448, 448), (500, 300), (640, 480), (1920, 1080), (3000, 4000), (4000, 300),
                (8000, 1000), (4000, 3000), (4000, 2000), (6000, 4000), (4032, 3024), (3024, 4032), (1024, 768),
                (449, 449), (447, 447), (1, 1), (20, 20), (55, 55), (45, 80), (49, 343), (47, 1316), (10000, 50),
                (20000, 100), (5000, 10), (5000, 9), (9, 5000), (16128, 448), (16129, 448)]


def write_layouts():
    """layouts.json: grid/resize/padding/token arithmetic for many sizes (no pixels), incl. f64-truncation cases
    (55x55 -> 447 wide), the cap search with area ties (4000x2000 -> 8x4) and rejected extreme ratios."""
    rows = []
    for w, h in LAYOUT_SIZES:
        try:
            lay = layout(w, h)
            rows.append({"size_wh": [w, h], "grid_wh": list(lay["grid"]), "resized_wh": list(lay["resized"]),
                         "pad_wh": list(lay["pad"]), "image_size_hw": list(lay["image_size"]), "uh_uw": list(lay["uhw"]),
                         "num_img_tokens": lay["num_img_tokens"]})
        except AssertionError:
            rows.append({"size_wh": [w, h], "error": "resized side < 10 px"})
    mt.dump(OUT / "layouts.json", rows)


def jpeg_record(img, f, name):
    """PIL's decode of the JPEG (saved as PNG) and how far it is from the PNG of the same content (JPEG loss)."""
    dec = np.array(img.convert("RGB"))
    Image.fromarray(dec).save(OUT / f"{name}.decoded.png", "PNG", optimize=True)
    diff = np.abs(dec.astype(int) - np.array(Image.open(IMG / f.replace(".jpg", ".png")).convert("RGB")).astype(int))
    return {"decoded": f"{name}.decoded.png",
            "decoder": {"pillow": Image.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
                        "encoded_as": "baseline, quality 90, 4:2:0, by the same Pillow/libjpeg-turbo"},
            "jpeg_loss_vs_png": {"pixels_differ": int((diff.max(-1) > 0).sum()), "pixels": diff.shape[0] * diff.shape[1],
                                 "channel_values_differ": int((diff > 0).sum()), "max_levels": int(diff.max()),
                                 "mean_abs_levels": round(float(diff.mean()), 4)}}


def image_fixtures(model, W, vcfg):
    """Per image: canvas PNG + safetensors (native values, checked against spec_image); images.json index."""
    index, pres = [], {}
    for f in IMAGES:
        name = f[:-4] if f.endswith(".png") else f
        img = Image.open(IMG / f)
        img.load()
        pre = pres[f] = preprocess(img)
        d_bic, proc_diff = check_preprocess(img, pre)
        pre["canvas"].save(OUT / f"{name}.canvas.png", "PNG", optimize=True)
        tower, seq, feats = native_image(model, pre)
        pre["feats"] = feats
        s_tower, s_seq, s_feats = spec_image(W, vcfg, pre["pixel_values"], pre["mask"], pre["grid"], pre["uhw"])
        n, (gw, gh) = pre["num_img_tokens"], pre["grid"]
        assert feats.shape == (n, model.config.hidden_size) and seq.shape[0] == n
        diff = {"tower": (tower - s_tower).abs().max().item(), "pooled_sequence": (seq - s_seq).abs().max().item(),
                "img_features": (feats - s_feats).abs().max().item(), "thumb_vs_numpy_bicubic": d_bic}
        assert max(diff.values()) < 1e-4, diff  # (exactly 0 for the tower here: same f32 ops in the same order)
        fl = spec_image(W, vcfg, pre["pixel_values"], pre["mask"], pre["grid"], pre["uhw"], flash=True)[2]
        out = {"image_size": torch.tensor(pre["image_size"]), "crop_grid": torch.tensor([gh, gw]),
               "attention_mask": pre["mask"], "num_img_tokens": torch.tensor([n]), "img_features": feats}
        if name in THUMB:
            out["global_thumb"] = pre["pixel_values"][0]
        if name in TOWER:
            out["tower_out"], out["pooled_sequence"] = tower, seq
        save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / f"{name}.safetensors"))
        rec = {"file": f, "name": name, "mode": img.mode, "size_wh": list(img.size), "grid_wh": [gw, gh],
               "resized_wh": list(pre["resized"]), "pad_wh": list(pre["pad"]), "image_size_hw": list(pre["image_size"]),
               "uh_uw": list(pre["uhw"]), "num_img_tokens": n, "canvas": f"{name}.canvas.png",
               "expected": f"{name}.safetensors", "arrays": sorted(out), "native_vs_spec_max_abs": diff,
               "flash_path_vs_eager_max_abs": (fl - s_feats).abs().max().item(),
               "native_image_processor_diff": proc_diff, **(jpeg_record(img, f, name) if f.endswith(".jpg") else {})}
        index.append(rec)
        print(f"{f:18s} {img.mode:4s} grid {gw}x{gh} resized {pre['resized']} pad {pre['pad']} tokens {n:5d} "
              f"native-vs-spec {diff['img_features']:.1e} flash-vs-eager {rec['flash_path_vs_eager_max_abs']:.2e} "
              f"native-processor {proc_diff}")
        if "jpeg_loss_vs_png" in rec:
            print(f"  JPEG vs PNG, decoded by {rec['decoder']}: {rec['jpeg_loss_vs_png']}")
    mt.dump(OUT / "images.json", index)
    return pres


def decoder_cases(model, W, cfg, pres):
    """cases.json + one safetensors per case: expanded ids, last logits, 12 greedy steps (full forwards)."""
    tok = mt.TokenizersBackend.from_pretrained(str(mt.TINY))
    meta = []
    for name, msgs, files in CASES:
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = expand(tok, prompt, [pres[f]["num_img_tokens"] for f in files])
        logits, toks, top_ids, top_vals, margin = greedy_mm(model, ids, batch([pres[f] for f in files]), N_STEPS)
        # end-to-end spec check: spec image features (in binding order) scattered into the spec decoder (§6.4)
        emb = W["model.embed_tokens.weight"][torch.tensor(ids)].clone()
        emb[torch.tensor(ids) == IMAGE_ID] = torch.cat([spec_image(W, cfg.vision_config, pres[f]["pixel_values"],
                                                                   pres[f]["mask"], pres[f]["grid"], pres[f]["uhw"])[2]
                                                        for f in files])
        ref = mt.spec_last_logits(W, cfg, ids, embeds=emb)
        dl = (ref - logits).abs().max().item()
        assert torch.allclose(ref, logits, atol=2e-4, rtol=1e-4), dl
        save_file({"input_ids": torch.tensor(ids), "logits_last": logits, "greedy": torch.tensor(toks),
                   "step_top_ids": top_ids, "step_top_logits": top_vals}, str(OUT / f"{name}.safetensors"))
        meta.append({"name": name, "mode": "vision", "messages": msgs, "images": files, "file": f"{name}.safetensors",
                     "prompt_len": len(ids), "max_new_tokens": N_STEPS, "min_margin": margin,
                     "add_generation_prompt": True, "prompt": prompt,
                     "num_img_tokens": [pres[f]["num_img_tokens"] for f in files]})
        print(f"{name:20s} L={len(ids):5d} min_margin={margin:.4f} spec-vs-native logits max|d|={dl:.2e} greedy={toks}")
        assert margin > 1e-3, f"{name}: margin {margin} too small; change the image seeds"
    mt.dump(OUT / "cases.json", meta)


def main():
    torch.manual_seed(mt.SEED)
    torch.set_num_threads(2)  # fixed, so reruns reproduce the float outputs bit for bit
    OUT.mkdir(parents=True, exist_ok=True)
    write_images()
    hub = mt.hub_config()
    cfg = mt.native_config(hub)
    model, W = mt.load_reference(cfg, hub, "vision")
    ie = model.model.embed_tokens_extend.image_embed
    assert ie.img_processor.config._attn_implementation == "eager"
    check_positions_and_counts(ie)
    write_layouts()
    pres = image_fixtures(model, W, cfg.vision_config)
    # transformers' default sdpa makes this tower CAUSAL when no crop of the batch is padded (the vision attention
    # has is_causal=True and the mask is None then); measured on an unpadded image. The fixtures use eager.
    ie.img_processor.config._attn_implementation = "sdpa"
    d = (native_image(model, pres["square_448x448.png"])[2] - pres["square_448x448.png"]["feats"]).abs().max()
    ie.img_processor.config._attn_implementation = "eager"
    print(f"sdpa vs eager on square_448x448 (no padding): max|d| img_features {d.item():.3e}")
    decoder_cases(model, W, cfg, pres)


if __name__ == "__main__":
    main()
