#!/usr/bin/env python3
"""Audio-path fixtures: espeak-ng speech clips + reference values of the tiny checkpoint.

Run from the repository root, after make_tiny.py:  python reference/make_audio.py
Writes fixtures/audio/ (speech clips: wav at several rates, flac, mp3) and fixtures/expected/audio/ (log-mel features,
Conformer output, projected features, decoder cases). Features follow the ORIGINAL hub feature extractor
(`Phi4MMAudioFeatureExtractor`, spec §5.1-5.2), re-implemented in numpy below; the native transformers extractor is
only compared. Encoder values come from transformers' native model (f32, eager) and are checked against a plain-torch
implementation of spec §5.4-5.5; for padded multi-audio batches the native masking is wrong (§8 item 21), so those
use the spec implementation (original semantics), validated against the native model with the mask fixed.
Needs espeak-ng, sox, flac, lame on PATH and `soundfile` in the venv.
"""
import re, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
import scipy
import scipy.signal
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny as mt    # noqa: E402  (config, checkpoint loader with LoRA merge, tokenizer, decoder spec check)
import make_vision as mv  # noqa: E402  (original image preprocessing, image batch, spec SigLIP)

AUD, OUT = Path("fixtures/audio"), Path("fixtures/expected/audio")
AUDIO_ID, IMAGE_ID, N_STEPS = 200011, 200010, 12
VOICE = "en-us"
NEWS = ("Good evening, and welcome to the weekly news summary. On Monday, the city council approved a plan to build a "
        "new library near the central park. The building will have three floors, a children's room, and a small "
        "theatre for readings and concerts. Construction is expected to start in the spring and to finish within two "
        "years. On Wednesday, heavy rain caused flooding in several villages along the river. Volunteers helped "
        "families move furniture to higher ground, and nobody was hurt. The water level has since dropped, and the "
        "roads are open again. Finally, the local football team won its match on Saturday by two goals to one, after "
        "a late goal in the final minute. That is all for this week. Thank you for listening, and have a pleasant "
        "weekend.")
# file -> (text, espeak-ng words per minute, sample rate, sox remix (None = mono), exact length in frames).
# espeak-ng writes 22050 Hz mono; sox resamples (rate -h, no dither), optionally remixes, then pads with silence.
CLIPS = {
    "speech_1s_16k.wav": ("What colour is it?", 200, 16000, None, 16000),
    "speech_10s_16k.wav": ("The weather was calm this morning, so we took the early train to the coast. At noon we ate "
                           "fresh bread and cheese by the harbour, and watched the fishing boats come in.", 175, 16000,
                           None, 160000),
    "speech_45s_16k.wav": (NEWS, 175, 16000, None, 720000),
    "speech_8k.wav": ("Please remember to close the windows before you leave the house.", 175, 8000, None, 32000),
    # right channel = 0.85 x left (before int16 rounding), so the channel average matters
    "speech_48k_stereo.wav": ("The museum opens at nine. Tickets cost twelve euros.", 175, 48000, ["1v1", "1v0.85"],
                              192000),
    "speech_44k1.wav": ("Count slowly from one to five: one, two, three.", 175, 44100, None, 176400)}
FLAC, MP3 = "speech_10s.flac", "speech_10s.mp3"     # both made from speech_10s_16k.wav
NO_FEATURES = {"speech_44k1.wav"}                    # only sample counts (the Rust side resamples 44.1 kHz itself)
WAVEFORM = {"speech_48k_stereo.wav", "speech_8k.wav", MP3}
TOKENS = {"speech_1s_16k.wav": 13, "speech_10s_16k.wav": 125, "speech_45s_16k.wav": 563}   # §5.6 examples
CASES = [  # (name, mode, messages, audio files, image files), in binding order
    ("transcribe_translate", "speech", [{"role": "user", "content": "<|audio_1|>Transcribe the audio to text, and then "
     "translate the audio to French. Use <sep> as a separator between the original transcript and the translation."}],
     ["speech_10s_16k.wav"], []),
    ("two_audios", "speech", [{"role": "user", "content": "<|audio_1|><|audio_2|>Transcribe both recordings."}],
     ["speech_1s_16k.wav", "speech_10s_16k.wav"], []),
    ("long_45s", "speech", [{"role": "user", "content": "<|audio_1|>Summarize the audio."}], ["speech_45s_16k.wav"], []),
    ("image_and_audio", "vision_speech", [{"role": "user", "content": "<|image_1|><|audio_1|>Answer the spoken question "
     "about the image."}], ["speech_1s_16k.wav"], ["square_448x448.png"]),
    ("rate_48k", "speech", [{"role": "user", "content": "<|audio_1|>Transcribe the audio."}], ["speech_48k_stereo.wav"], []),
    ("rate_8k", "speech", [{"role": "user", "content": "<|audio_1|>Transcribe the audio."}], ["speech_8k.wav"], [])]


def run(*cmd):
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "clip" not in r.stderr.lower(), r.stderr
    return r.stdout + r.stderr


def tool_versions():
    return {"espeak-ng": run("espeak-ng", "--version").split("Data at")[0].strip(),
            "sox": run("sox", "--version").strip(), "flac": run("flac", "--version").strip(),
            "lame": run("lame", "--version").splitlines()[0].strip(),
            "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__, "scipy": scipy.__version__,
            "numpy": np.__version__}


# ----------------------------------------------------------------------------- clips
def write_clips():
    """espeak-ng (fixed voice/speed) -> sox: resample (rate -h, -D: no dither), remix, pad to an exact length."""
    AUD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for f, (text, wpm, rate, remix, n) in CLIPS.items():
            raw, res = f"{tmp}/espeak.wav", f"{tmp}/rate.wav"
            run("espeak-ng", "-v", VOICE, "-s", str(wpm), "-p", "50", "-a", "100", "-w", raw, text)
            run("sox", "-D", "-R", raw, "-b", "16", res, "rate", "-h", str(rate), *(["remix", *remix] if remix else []))
            got = sf.info(res).frames
            assert got <= n, (f, got, n)          # speech fits; pad the end with silence to exactly n frames
            run("sox", "-D", "-R", res, str(AUD / f), "pad", "0", f"{n - got}s")
            info = sf.info(str(AUD / f))
            assert (info.samplerate, info.frames, info.channels, info.subtype) == (rate, n, 2 if remix else 1, "PCM_16")
    run("flac", "--silent", "--best", "-f", "-o", str(AUD / FLAC), str(AUD / "speech_10s_16k.wav"))
    # MPEG-2 layer III, 16 kHz mono, CBR 64 kbit/s, no ID3 tag (LAME writes its Xing/LAME info frame: delay/padding)
    run("lame", "--quiet", "-m", "m", "-b", "64", "--noreplaygain", str(AUD / "speech_10s_16k.wav"), str(AUD / MP3))


def load_audio(path):
    """Like the model card: soundfile.read -> float64 (int16 -> x/32768), shape [n] or [n, channels]."""
    return sf.read(str(path))


def lame_tag(path):
    """Frame count of the Xing 'Info' header and encoder delay/padding of the LAME tag (gapless playback data)."""
    b = path.read_bytes()
    i, j = b.find(b"Info"), b.find(b"LAME")
    d = b[j + 21: j + 24]
    return {"audio_frames": int.from_bytes(b[i + 8: i + 12], "big"), "samples_per_frame": 576,
            "encoder_delay": (d[0] << 4) | (d[1] >> 4), "end_padding": ((d[1] & 15) << 8) | d[2],
            "note": "decoders add 529 samples of decoder delay: skip delay+529 at the start, drop padding-529 at the end"}


# ----------------------------------------------------------------------------- features (§5.1-5.2, original)
def speechlib_mel(sr=16000, n_fft=512, n_mels=80, fmin=0.0, fmax=7690.0):
    """SpeechLib mel matrix [n_mels, n_fft/2+1]: HTK mel, triangles in mel space, bins klo..khi-1 only, no norm."""
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    klo, khi = int(fmin * n_fft / sr + 0.5) + 1, int(fmax * n_fft / sr + 0.5)
    centers, step = np.linspace(mel(fmin), mel(fmax), n_mels + 2), (mel(fmax) - mel(fmin)) / (n_mels + 1)
    m = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for j in range(n_mels):
        for k in range(klo, khi):
            mk = 1127.0 * np.log(1.0 + k * sr / (n_fft * 700.0))
            if centers[j] < mk < centers[j + 2]:
                m[j, k] = 1.0 - abs(centers[j + 1] - mk) / step
    return m


MEL = speechlib_mel()


def original_features(wav, fs):
    """Phi4MMAudioFeatureExtractor._extract_features: -> (log-mel f32 [T, 80], the 1-D signal that was framed, fs)."""
    wav = np.squeeze(wav)
    if wav.ndim == 2:                                   # [n, channels] -> mean of the channels
        wav = wav.mean(1)
    if fs > 16000:                                      # integer decimation only, then *assumed* 16 kHz
        wav, fs = scipy.signal.resample_poly(wav, 1, fs // 16000), 16000
    elif 8000 < fs < 16000:
        wav, fs = scipy.signal.resample_poly(wav, 1, fs // 8000), 8000
    elif fs < 8000:
        raise ValueError(f"unsupported sample rate {fs}")
    win, hop, n_fft = (400, 160, 512) if fs == 16000 else (200, 80, 256)   # 8 kHz: "fill-zero" mode
    n_frames = (len(wav) - win) // hop + 1             # no centring, trailing samples dropped
    frames = np.array([wav[t * hop: t * hop + win] for t in range(n_frames)], dtype=np.float32)
    prev = np.roll(frames, 1, axis=1)
    prev[:, 0] = prev[:, 1]                             # per-frame pre-emphasis, e[0] = y[0] - 0.97 y[0]
    frames = (frames - 0.97 * prev) * 32768
    spec = np.fft.rfft(np.hamming(win) * frames, n=n_fft, axis=1).astype(np.complex64)   # symmetric Hamming
    if fs == 8000:                                      # drop Nyquist, append 129 zero bins (becomes complex128)
        spec = np.concatenate((spec[:, :-1], np.zeros((n_frames, n_fft // 2 + 1))), axis=1)
    power = np.abs(spec).astype(np.float32) ** 2
    return np.log(np.clip(power.dot(MEL.T), 1.0, None)).astype(np.float32), wav, fs


def num_tokens(n_frames):
    return -(-n_frames // 8)                            # ceil(T / 8); the qformer ceiling (rate 1) is a no-op


def native_features(wav, mel=None):
    """transformers' Phi4MultimodalFeatureExtractor (16 kHz only); `mel` [80, 257] replaces its filter bank."""
    from transformers import Phi4MultimodalFeatureExtractor
    fe = Phi4MultimodalFeatureExtractor()
    if mel is not None:
        fe.mel_filters = mel.T.astype(np.float64)
    return fe(wav.astype(np.float32), sampling_rate=16000, return_tensors="pt")["audio_input_features"][0].numpy()


# ----------------------------------------------------------------------------- spec encoder (§5.4-5.5)
ENC = "model.embed_tokens_extend.audio_embed.encoder."


def spec_encoder(W, acfg, feats):
    """Plain-torch Conformer on a list of log-mel [T_i, 80] (one zero-padded batch, ORIGINAL semantics): padding
    before the global normalisation; if B > 1 keys at t' >= ceil(T_i/8) masked with -inf (probabilities zeroed);
    > 500 frames: independent 500-frame windows (the zero-padded tail is attended to when B == 1)."""
    g = lambda k: W[ENC + k]
    B, T, D, H = len(feats), max(len(f) for f in feats), acfg.hidden_size, acfg.num_attention_heads
    x = torch.zeros(B, T, 80)
    for i, f in enumerate(feats):
        x[i, :len(f)] = torch.from_numpy(f)
    x = (x - g("encoder_embedding.global_mean")) * g("encoder_embedding.global_invstd")
    h = F.relu(F.conv2d(x[:, None], g("embed.conv.0.weight"), g("embed.conv.0.bias"), stride=2, padding=1))
    for dw, pw in ((2, 3), (5, 6)):                     # depthwise 3x3 s2 -> pointwise 1x1 -> ReLU
        h = F.conv2d(h, g(f"embed.conv.{dw}.weight"), g(f"embed.conv.{dw}.bias"), stride=2, padding=1, groups=h.shape[1])
        h = F.relu(F.conv2d(h, g(f"embed.conv.{pw}.weight"), g(f"embed.conv.{pw}.bias")))
    n = h.shape[2]
    assert n == num_tokens(T)
    h = h.permute(0, 2, 1, 3).reshape(B, n, -1) @ g("embed.out.weight").T + g("embed.out.bias")  # ch*10 + mel
    valid = torch.arange(n)[None] < torch.tensor([num_tokens(len(f)) for f in feats])[:, None] if B > 1 else None
    L = n
    if n > 500:
        L, pad = 500, (-n) % 500
        h = F.pad(h, (0, 0, 0, pad)).reshape(-1, L, D)
        valid = None if valid is None else F.pad(valid, (0, pad)).reshape(-1, L)
    md = acfg.bias_max_distance
    rel = (torch.arange(L)[None, :] - torch.arange(L)[:, None]).clamp(-md, md - 1) + md   # [i, j] -> j - i
    bias = g("relative_attention_bias_layer.bias_values.weight")[rel].permute(2, 0, 1)[None]   # [1, H, L, L]
    ln = lambda v, k: F.layer_norm(v, (D,), g(k + ".weight"), g(k + ".bias"), 1e-5)
    lin = lambda v, k: v @ g(k + ".weight").T + g(k + ".bias")
    pw = lambda v, k: v @ g(k + ".weight")[:, :, 0].T + g(k + ".bias")                      # kernel-1 Conv1d

    def ffn(v, k):                                      # value first, gate second
        val, gate = lin(ln(v, k + ".layer_norm"), k + ".gate_up_proj").chunk(2, -1)
        return lin(val * F.silu(gate), k + ".down_proj")

    def mhsa(v, k):
        q, kk, vv = (lin(v, f"{k}.{s}_proj").view(v.shape[0], L, H, -1).transpose(1, 2) for s in "qkv")
        s = (q * q.shape[-1] ** -0.5) @ kk.transpose(-1, -2) + bias
        if valid is None:
            a = torch.softmax(s, -1)
        else:
            km = ~valid[:, None, None, :]
            a = torch.softmax(s.masked_fill(km, float("-inf")), -1).masked_fill(km, 0.0)
        return lin((a @ vv).transpose(1, 2).reshape(v.shape[0], L, D), k + ".o_proj")

    def conv(v, k):
        u = pw(ln(v, k + ".layer_norm"), k + ".glu.ext_pw_conv_1d")
        a, gate = u.chunk(2, -1)
        u = (a + g(k + ".glu.b1")[0, :, 0]) * F.silu(gate + g(k + ".glu.b2")[0, :, 0])
        w, ks = g(k + ".dw_sep_conv_1d.dw_conv.weight")[:, 0, :], acfg.kernel_size      # causal: t-2, t-1, t
        up = F.pad(u, (0, 0, ks - 1, 0))
        u = sum(up[:, j:j + L] * w[:, j] for j in range(ks)) + g(k + ".dw_sep_conv_1d.dw_conv.bias")
        return pw(F.silu(pw(u, k + ".dw_sep_conv_1d.pw_conv")), k + ".ext_pw_conv_1d")

    for b in range(acfg.num_blocks):
        k = f"encoders.{b}."
        h = h + 0.5 * ffn(h, k + "feed_forward_in")
        h = h + mhsa(ln(h, k + "layer_norm_att"), k + "self_attn")
        h = h + conv(h, k + "conv")
        h = h + 0.5 * ffn(h, k + "feed_forward_out")
        h = ln(h, k + "layer_norm")
    return h.reshape(B, -1, D)[:, :n]


def spec_project(W, enc, mode):
    """§5.5: Linear -> exact GELU -> Linear; mode "speech" or "vision_speech" (audio_projection.vision)."""
    p = "model.embed_tokens_extend.audio_embed."
    up = F.gelu(enc @ W[p + f"up_proj_for_{mode}.weight"].T + W[p + f"up_proj_for_{mode}.bias"])
    return up @ W[p + f"down_proj_for_{mode}.weight"].T + W[p + f"down_proj_for_{mode}.bias"]


@torch.no_grad()
def native_encoder(model, feats, fix_mask=False):
    """Native Conformer on a zero-padded batch (mask only if B > 1, as the processors do). fix_mask=True replaces
    the native '+bool' mask by the original's -inf key mask (pre-hook on every block) to validate spec_encoder."""
    enc = model.model.embed_tokens_extend.audio_embed.encoder
    T = max(len(f) for f in feats)
    x = torch.zeros(len(feats), T, 80)
    for i, f in enumerate(feats):
        x[i, :len(f)] = torch.from_numpy(f)
    mask = torch.arange(T)[None] < torch.tensor([len(f) for f in feats])[:, None] if len(feats) > 1 else None
    hooks, bias = [], []
    if fix_mask:
        hooks.append(enc.relative_attention_bias_layer.register_forward_hook(lambda m, i, o: bias.append(o)))
        fix = lambda m, a: (a[0], bias[0] + torch.zeros_like(a[1]).masked_fill((a[1] - bias[0]) < 0.5, float("-inf")))
        hooks += [blk.register_forward_pre_hook(fix) for blk in enc.encoders]
    out = enc(x, mask)
    for hk in hooks:
        hk.remove()
    return out


def native_project(model, enc, mode):
    ae = model.model.embed_tokens_extend.audio_embed
    up, down = (ae.up_proj_for_speech, ae.down_proj_for_speech) if mode == "speech" else \
        (ae.up_proj_for_vision_speech, ae.down_proj_for_vision_speech)
    with torch.no_grad():
        return down(F.gelu(up(enc)))


# ----------------------------------------------------------------------------- per-clip fixtures
def maxabs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def clip_fixtures(model, W, acfg, versions):
    from transformers import Phi4MultimodalFeatureExtractor
    nat_mel = Phi4MultimodalFeatureExtractor().mel_filters.T            # [80, 257]
    d_mel = np.argwhere(np.abs(nat_mel - MEL) > 1e-6)
    mel_diff = [{"filter": int(j), "bin": int(k), "speechlib": float(MEL[j, k]), "native": float(nat_mel[j, k])}
                for j, k in d_mel]
    save_file({"speechlib_mel": torch.from_numpy(MEL)}, str(OUT / "mel_filters.safetensors"))
    print(f"mel: native filter bank differs from SpeechLib at {mel_diff}")
    index, feats = [], {}
    for f in [*CLIPS, FLAC, MP3]:
        wav, fs = load_audio(AUD / f)
        rec = {"file": f, "sample_rate": fs, "channels": 1 if wav.ndim == 1 else wav.shape[1], "frames": len(wav),
               "duration_s": len(wav) / fs}
        if f in CLIPS:
            text, wpm, _, remix, _ = CLIPS[f]
            rec["made_by"] = {"espeak-ng": {"voice": VOICE, "wpm": wpm, "pitch": 50, "amplitude": 100, "text": text},
                              "sox": f"rate -h {fs}" + (f" remix {' '.join(remix)}" if remix else "") + " + pad (-D -R)"}
        if f in NO_FEATURES:   # 44.1 kHz: what the original extractor does (decimate by 2, play as 16 kHz) vs proper
            n_q = len(scipy.signal.resample_poly(wav, 1, fs // 16000))
            n_p = round(len(wav) * 16000 / fs)
            rec["original_quirk"] = {"resample_poly": [1, fs // 16000], "samples_treated_as_16k": n_q,
                                     "num_frames": (n_q - 400) // 160 + 1, "num_audio_tokens": num_tokens((n_q - 400) // 160 + 1)}
            rec["proper_16k"] = {"samples": n_p, "num_frames": (n_p - 400) // 160 + 1,
                                 "num_audio_tokens": num_tokens((n_p - 400) // 160 + 1)}
            index.append(rec)
            print(f"{f:22s} {fs} Hz n={len(wav)}: original quirk {rec['original_quirk']}, proper {rec['proper_16k']}")
            continue
        lm, sig, fs_eff = original_features(wav, fs)
        n_frames, n_tok = lm.shape[0], num_tokens(lm.shape[0])
        win, hop = (400, 160) if fs_eff == 16000 else (200, 80)
        assert n_frames == (len(sig) - win) // hop + 1
        if f in TOKENS:
            assert n_tok == TOKENS[f], (f, n_tok)
        name = f[:-4] if f.endswith(".wav") else f
        rec.update({"name": name, "feature_mode": {16000: "16k", 8000: "8k fill-zero"}[fs_eff],
                    "signal_samples": len(sig), "num_frames": n_frames, "num_audio_tokens": n_tok})
        if fs > 16000:
            rec["resample_poly"] = [1, fs // 16000]
        if f == FLAC:        # lossless: identical samples and features to the wav
            ref = feats["speech_10s_16k.wav"]
            assert np.array_equal(wav, load_audio(AUD / "speech_10s_16k.wav")[0]) and np.array_equal(lm, ref)
            rec.update({"expected": "speech_10s_16k.safetensors", "identical_to": "speech_10s_16k.wav"})
            index.append(rec)
            print(f"{f:22s} samples and log-mel identical to speech_10s_16k.wav")
            continue
        feats[f] = lm
        enc = native_encoder(model, [lm])[0]
        s_enc = spec_encoder(W, acfg, [lm])[0]
        sp, s_sp = native_project(model, enc, "speech"), spec_project(W, s_enc, "speech")
        assert enc.shape == (n_tok, acfg.hidden_size)
        out = {"log_mel": torch.from_numpy(lm), "num_audio_tokens": torch.tensor([n_tok]), "encoder_out": enc,
               "speech_features": sp}
        diff = {"encoder_out": (enc - s_enc).abs().max().item(), "speech_features": (sp - s_sp).abs().max().item()}
        if f == "speech_10s_16k.wav":
            out["vision_speech_features"] = native_project(model, enc, "vision_speech")
            diff["vision_speech_features"] = (out["vision_speech_features"] - spec_project(W, s_enc, "vision_speech")).abs().max().item()
        assert max(diff.values()) < 1e-4, diff
        rec["native_vs_spec_max_abs"] = diff
        if f in WAVEFORM:
            out["waveform"] = torch.from_numpy(sig.astype(np.float32))
        if fs_eff == 16000:
            nat = native_features(sig)
            assert nat.shape == lm.shape
            rec["native_feature_extractor_max_abs"] = {"as_is": maxabs(nat, lm),
                                                       "with_speechlib_mel": maxabs(native_features(sig, MEL), lm)}
        if f == MP3:
            ref = load_audio(AUD / "speech_10s_16k.wav")[0]
            m = min(len(ref), len(wav))
            lag = int(np.argmax([np.dot(ref[:m - 2000], wav[d:d + m - 2000]) for d in range(0, 2000)]))
            rec["decoded_by"] = {"soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__,
                                 "note": "libsndfile's MPEG decoder (mpg123), soundfile.read default float64"}
            rec["encoded_by"] = versions["lame"] + ": -m m -b 64 --noreplaygain (MPEG-2 layer III, 16 kHz mono CBR)"
            rec["lame_tag"] = lame_tag(AUD / MP3)
            rec["vs_wav"] = {"wav_frames": len(ref), "best_lag_samples": lag,
                             "max_abs_after_lag": maxabs(ref[:m - lag], wav[lag:m]) if lag < m else None}
            assert np.array_equal(sig.astype(np.float32).astype(np.float64), sig)   # f32 decode: stored exactly
        rec.update({"expected": f"{name}.safetensors", "arrays": sorted(out)})
        save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / f"{name}.safetensors"))
        index.append(rec)
        print(f"{f:22s} {fs:5d} Hz x{rec['channels']} n={len(wav):6d} -> {rec['feature_mode']:12s} T={n_frames:5d} "
              f"tokens={n_tok:4d} native-vs-spec {diff} native FE {rec.get('native_feature_extractor_max_abs')}")
        if f == MP3:
            print(f"  mp3 decoded by soundfile {sf.__version__} / {sf.__libsndfile_version__}: {rec['vs_wav']}")
    return index, feats, mel_diff


def batch_check(model, W, acfg, feats):
    """Several audios = one zero-padded batch. Spec (original) vs native with the fixed mask (must agree) and vs native
    as is (+1/+0 mask bug). Also how far the short clip's rows move compared with encoding it alone."""
    fl = [feats[f] for f in ("speech_1s_16k.wav", "speech_10s_16k.wav")]
    spec = spec_encoder(W, acfg, fl)
    fixed, buggy = native_encoder(model, fl, fix_mask=True), native_encoder(model, fl)
    n0 = num_tokens(len(fl[0]))
    alone = spec_encoder(W, acfg, [fl[0]])[0]
    d = {"spec_vs_native_fixed_mask": (spec[0, :n0] - fixed[0, :n0]).abs().max().item(),
         "spec_vs_native_fixed_mask_long_clip": (spec[1] - fixed[1]).abs().max().item(),
         "native_as_is_vs_original_short_clip": (spec[0, :n0] - buggy[0, :n0]).abs().max().item(),
         "native_as_is_vs_original_long_clip": (spec[1] - buggy[1]).abs().max().item(),
         "short_clip_batched_vs_alone": (spec[0, :n0] - alone).abs().max().item()}
    assert d["spec_vs_native_fixed_mask"] < 1e-4 and d["spec_vs_native_fixed_mask_long_clip"] < 1e-4, d
    print(f"two-audio batch: {d}")
    return spec, d


# ----------------------------------------------------------------------------- decoder cases
def expand(tok, prompt, n_img, n_aud):
    """§6.3: markers -> placeholder tokens (index ignored), tokenize, i-th placeholder -> its token count."""
    text = re.sub(r"<\|image_\d+\|>", "<|endoftext10|>", prompt)
    ids = tok(re.sub(r"<\|audio_\d+\|>", "<|endoftext11|>", text))["input_ids"]
    assert ids.count(IMAGE_ID) == len(n_img) and ids.count(AUDIO_ID) == len(n_aud)
    it_i, it_a, out = iter(n_img), iter(n_aud), []
    for t in ids:
        out += [t] * (next(it_i) if t == IMAGE_ID else next(it_a) if t == AUDIO_ID else 1)
    return out


@torch.no_grad()
def greedy(model, ids, n, media=None, prompt_embeds=None):
    """N greedy steps, one full forward each (no cache, no EOS stop), top-8 per step. Either the native path
    (input_ids + media kwargs, encoders re-run every step) or given prompt embeddings + token embeddings."""
    E = model.model.embed_tokens.weight
    seq, toks, top_ids, top_vals, margin = list(ids), [], [], [], float("inf")
    for _ in range(n):
        if prompt_embeds is None:
            out = model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1, **media)
        else:
            emb = torch.cat([prompt_embeds, E[torch.tensor(seq[len(ids):], dtype=torch.long)]])
            out = model(inputs_embeds=emb[None], use_cache=False, logits_to_keep=1)
        logits = out.logits[0, -1]
        if not toks:
            first = logits.clone()
        v, i = torch.topk(logits, 8)
        margin = min(margin, (v[0] - v[1]).item())
        toks.append(i[0].item()); top_ids.append(i); top_vals.append(v); seq.append(i[0].item())
    return first, toks, torch.stack(top_ids), torch.stack(top_vals), margin


@torch.no_grad()
def native_rows(model, ids, media):
    """The decoder's layer-0 input rows at the audio placeholders in a native forward (= merged audio features)."""
    got = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: got.append((a[0] if a else kw["hidden_states"])[0]), with_kwargs=True)
    model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1, **media)
    hook.remove()
    return got[0][torch.tensor(ids) == AUDIO_ID]


def decoder_cases(models, cfg, feats, batched, batch_diff):
    tok = mt.TokenizersBackend.from_pretrained(str(mt.TINY))
    meta = []
    for name, mode, msgs, auds, imgs in CASES:
        model, W = models["vision" if imgs else "speech"]
        proj = "vision_speech" if imgs else "speech"
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pres = [mv.preprocess(Image.open(mv.IMG / f)) for f in imgs]
        fl = [feats[f] for f in auds]
        n_aud = [num_tokens(len(x)) for x in fl]
        ids = expand(tok, prompt, [p["num_img_tokens"] for p in pres], n_aud)
        # spec embeddings (original semantics): token rows, image rows (spec SigLIP), audio rows (spec Conformer)
        emb = W["model.embed_tokens.weight"][torch.tensor(ids)].clone()
        if pres:
            emb[torch.tensor(ids) == IMAGE_ID] = torch.cat([mv.spec_image(W, cfg.vision_config, p["pixel_values"], p["mask"],
                                                                           p["grid"], p["uhw"])[2] for p in pres])
        enc = batched if len(fl) > 1 else spec_encoder(W, cfg.audio_config, fl)
        aud_rows = torch.cat([spec_project(W, enc[i, :k], proj) for i, k in enumerate(n_aud)])
        emb[torch.tensor(ids) == AUDIO_ID] = aud_rows
        x = torch.zeros(len(fl), max(len(f) for f in fl), 80)
        for i, f in enumerate(fl):
            x[i, :len(f)] = torch.from_numpy(f)
        media = {"audio_input_features": x, "audio_embed_sizes": torch.tensor(n_aud),
                 "audio_attention_mask": (torch.arange(x.shape[1])[None] < torch.tensor([len(f) for f in fl])[:, None])
                 if len(fl) > 1 else None, **(mv.batch(pres) if pres else {})}
        extra, arrays = {}, {"audio_embeds": aud_rows}
        if len(fl) == 1:    # native = original semantics for a single audio: record the native path
            logits, toks, top_ids, top_vals, margin = greedy(model, ids, N_STEPS, media=media)
            arrays["audio_embeds"] = native_rows(model, ids, media)      # the rows the recorded logits used
            extra["native_vs_spec_audio_embeds_max_abs"] = (arrays["audio_embeds"] - aud_rows).abs().max().item()
            assert extra["native_vs_spec_audio_embeds_max_abs"] < 1e-4, extra
        else:               # padded batch: native masking is wrong -> decoder on the spec (original) embeddings
            logits, toks, top_ids, top_vals, margin = greedy(model, ids, N_STEPS, prompt_embeds=emb)
            arrays["batch_encoder_out"] = enc                              # [B, max N, 32], rows >= N_i are padding
            nat = greedy(model, ids, N_STEPS, media=media)
            extra["native_transformers_as_is"] = {"logits_last_max_abs_diff": (nat[0] - logits).abs().max().item(),
                                                  "greedy": nat[1], "encoder": batch_diff}
        ref = mt.spec_last_logits(W, cfg, ids, embeds=emb)
        dl = (ref - logits).abs().max().item()
        assert torch.allclose(ref, logits, atol=2e-4, rtol=1e-4), dl
        save_file({"input_ids": torch.tensor(ids), "logits_last": logits, "greedy": torch.tensor(toks),
                   "step_top_ids": top_ids, "step_top_logits": top_vals, **{k: v.contiguous() for k, v in arrays.items()}},
                  str(OUT / f"{name}.safetensors"))
        meta.append({"name": name, "mode": mode, "messages": msgs, "audios": auds, "images": imgs,
                     "file": f"{name}.safetensors", "prompt_len": len(ids), "max_new_tokens": N_STEPS,
                     "min_margin": margin, "add_generation_prompt": True, "prompt": prompt, "num_audio_tokens": n_aud,
                     "num_img_tokens": [p["num_img_tokens"] for p in pres], "spec_vs_recorded_logits_max_abs": dl,
                     **extra})
        print(f"{name:20s} mode={mode:13s} L={len(ids):5d} audio tokens {n_aud} min_margin={margin:.4f} "
              f"spec-vs-recorded logits {dl:.2e} greedy={toks} {extra.get('native_transformers_as_is', '')}")
        assert margin > 1e-3, f"{name}: margin {margin} too small; change the clip or prompt"
    mt.dump(OUT / "cases.json", meta)


def main():
    torch.manual_seed(mt.SEED)
    torch.set_num_threads(2)   # fixed, so reruns reproduce the float outputs bit for bit
    OUT.mkdir(parents=True, exist_ok=True)
    versions = tool_versions()
    write_clips()
    hub = mt.hub_config()
    cfg = mt.native_config(hub)
    models = {m: mt.load_reference(cfg, hub, m) for m in ("speech", "vision")}
    for m, _ in models.values():
        assert m.model.embed_tokens_extend.audio_embed.encoder.config._attn_implementation == "eager"
    model, W = models["speech"]
    index, feats, mel_diff = clip_fixtures(model, W, cfg.audio_config, versions)
    batched, batch_diff = batch_check(model, W, cfg.audio_config, feats)
    mt.dump(OUT / "audios.json", {"tools": versions, "mel_native_vs_speechlib": mel_diff, "two_audio_batch": batch_diff,
                                  "audios": index})
    decoder_cases(models, cfg, feats, batched, batch_diff)


if __name__ == "__main__":
    main()
