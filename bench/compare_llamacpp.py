#!/usr/bin/env python3
"""Side-by-side CPU benchmark: phi4mm against llama.cpp on the same decoder weights.

    python3 bench/compare_llamacpp.py MODEL_DIR [--work ~/.cache/phi4mm-bench]
        [--precisions bf16,q8_0,q4_0,q4_k_m] [--threads 2] [--prompt-tokens 512]
        [--gen-tokens 64] [--rounds 1] [--phi4mm-q4k-as q4_0] [--json-out PATH]

MODEL_DIR is a checkpoint in the official hub layout (safetensors shards + index + config.json +
tokenizer.json), e.g. the full-size random one from `reference/make_full.py`. Build phi4mm first
with `cargo build --release -p phi4mm-cli`. The python running this needs numpy and the `gguf`
package, and cmake (the `cmake` package from PyPI is fine; it is looked for next to this python
too) plus a C/C++ compiler; torch is not needed. Everything this writes goes under --work (default
~/.cache/phi4mm-bench), never into the repository. Each step is skipped when its output exists.

1. Build llama.cpp from a registry package: `python -m pip download --no-deps --no-binary
   llama-cpp-python llama-cpp-python==VERSION` (VERSION: --llama-cpp-python-version, default
   below) fetches the sdist, which carries llama.cpp's source in vendor/llama.cpp. Only that
   package is forced to source: `--no-binary :all:` would also build pip's metadata build
   dependencies (cmake itself) from source. The sdist is unpacked under --work and only the
   `llama-bench`, `llama-quantize`, `llama-batched-bench` (for compare_llamacpp_batched.py) and
   `llama-server` (for compare_serve.py) targets are built (CMake Release, -DGGML_NATIVE=ON,
   static, no curl/OpenSSL, no web UI, nothing downloaded), `-j --jobs` (default 2) under `nice`.
   --llama-bin DIR uses an existing build instead (a folder holding both binaries).

2. Write the decoder as a GGUF in BF16 with the `gguf` package, arch `phi3` (how llama.cpp runs
   Phi-4-mini; Phi-4-multimodal's text decoder is Phi-4-mini). Safetensors headers are parsed here
   (u64 LE length + JSON) and every tensor is copied from a per-tensor np.memmap of its raw bytes
   (bf16 kept as uint16), so memory stays at about one tensor's mapping. Only the base decoder
   weights go in; the LoRA adapters (text mode uses the base weights) and the vision/audio encoders
   are left out. Names: model.embed_tokens -> token_embd (tied: no output.weight, llama.cpp reuses
   token_embd), qkv_proj.base_layer -> blk.N.attn_qkv (q, k, v rows, as stored), o_proj ->
   attn_output, gate_up_proj -> ffn_up (gate rows first, then up: llama.cpp's phi3 graph applies
   ggml_swiglu to ffn_up's output, which takes SiLU of the first half, the same order),
   down_proj -> ffn_down, input/post_attention_layernorm -> attn_norm/ffn_norm and model.norm ->
   output_norm (norms as F32), plus `rope_factors_long.weight` / `rope_factors_short.weight` (F32,
   48 each) from config.json's longrope factors. Metadata: phi3.context_length =
   max_position_embeddings, phi3.rope.scaling.original_context_length, embedding/feed-forward
   length, block count, head counts, RMS eps, phi3.rope.dimension_count = head_dim *
   partial_rotary_factor (96), rope.freq_base, phi3.rope.scaling.attn_factor = sqrt(1 + ln(s) /
   ln(original ctx)) with s = max / original ctx (LongRoPE's factor on cos/sin, applied for short
   and long factors alike), attention.sliding_window = 0 (llama.cpp disables Phi SWA anyway).
   llama.cpp picks the long factors only when the context is larger than the original context
   length (4096), so llama-bench's short contexts run with the short factors, as phi4mm does.
   Tokenizer: tokenizer.json's byte-level BPE as `gpt2` with pre-tokenizer `gpt-4o` (the o200k
   split; llama.cpp's converter identifies Phi-4-mini's tokenizer by a hash of its encoding of a
   test text, and this tokenizer gives the hash listed for gpt-4o), token list padded to the
   embedding's 200064 rows with unused `[PADi]` entries, added tokens as control (special or
   `<|...|>`) or user-defined, merges, bos/eos/unk/pad from tokenizer_config.json, no automatic
   BOS, and the chat template. Written to --work/gguf/NAME-bf16.gguf with a NAME-bf16.gguf.src.json
   stamp of the source shards (path, size, mtime); a changed checkpoint is converted again.

3. Quantise with the built `llama-quantize` (its default mixes; --quantize-pure passes --pure) to
   Q8_0, Q4_0 and Q4_K_M as needed by --precisions. With the tied embedding llama-quantize stores
   token_embd (also the output projection) in a higher-precision type than the rest for the
   Q4_0/Q4_K_M files (Q6_K with this llama.cpp; phi4mm's --quant q4_0 currently keeps its tied head at Q8_0); the
   type is printed and the sizes are in the table. llama-quantize's output goes to --work/logs.

4. Check that every GGUF loads and runs: `llama-bench -v -p 8 -n 2 -r 1 --no-warmup` once per
   file, checking the loader's printed n_embd, n_layer, n_head, n_head_kv, n_rot, n_ff, n_vocab and
   n_ctx_orig_yarn against config.json (a `.ok` stamp next to the file records the pass).

5. For each precision and each of --rounds rounds, run one engine at a time, alternately:
   `llama-bench -m FILE -p P -n N -t T -r 1 -o json` and `phi4mm bench --json --text-only
   --threads T --prompt-tokens P --gen-tokens N --model M`: for bf16 M is the checkpoint itself;
   for q8_0 / q4_0 (and for Q4_K_M, --phi4mm-q4k-as, default q4_0, phi4mm's nearest 4-bit
   format) M is phi4mm's own quantised copy made once by `phi4mm quantize` under
   --work/phi4mm/ (delete it after changing phi4mm's quantised layout), which phi4mm maps as
   llama.cpp maps its GGUF; --phi4mm-load-quant runs the checkpoint with `--quant Q` instead.
   `--text-only` loads no image/audio encoder and no LoRA adapter, like llama.cpp's decoder-only
   GGUF. As llama-bench runs pp and tg as separate tests, phi4mm runs twice per round: prefill
   from `--prompt-tokens P --gen-tokens 1`, decode from `--prompt-tokens 1 --gen-tokens N`
   (peak RSS is the larger of the two). A phi4mm run that fails (e.g. a format it does not have) is printed and
   shown as n/a. Both engines time random-token prompts and decode from a (nearly) empty cache. Peak RSS is each child's ru_maxrss
   from os.wait4 (the same measure for both; mmapped weights count once touched). Children's
   output is kept in --work/logs. /proc/stat is read around every timed run to tell how many cores
   other processes kept busy meanwhile; above 0.3 the table carries a warning (a busy machine
   slows llama.cpp, whose threads spin at each barrier, far more than phi4mm).

6. Print a markdown table per precision: engine, weights GiB (llama.cpp: the GGUF file; phi4mm:
   the decoder weights it reports, `decoder_gib`), prefill tok/s (ppP), decode tok/s (tgN), peak
   RSS GiB, and a row with phi4mm / llama.cpp for prefill and decode. Speeds are the best of the
   rounds, RSS the largest. --json-out PATH saves every run's raw results.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ["llama-bench", "llama-quantize", "llama-batched-bench", "llama-server"]  # llama-server: bench/compare_serve.py
# precision -> (llama-quantize type / file tag, phi4mm --quant); q4_k_m's phi4mm format comes from
# --phi4mm-q4k-as.
PRECISIONS = {"bf16": ("BF16", "none"), "q8_0": ("Q8_0", "q8_0"), "q4_0": ("Q4_0", "q4_0"),
              "q4_k_m": ("Q4_K_M", None)}
GIB = float(1 << 30)
# Average cores kept busy by other processes during a timed run above which the table warns.
BUSY_LOAD = 0.3


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("+", " ".join(shlex.quote(str(c)) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def cpu_busy_s():
    """Seconds of CPU time the whole machine has spent busy (all cores; /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    guest = sum(v[8:10]) if len(v) > 9 else 0  # already counted in user/nice
    return (sum(v) - idle - guest) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd, log_base):
    """Run cmd alone; stdout/stderr go to LOG_BASE.out/.err.

    Returns (rc, stdout, stderr, info) with info: peak_rss_kib (the child's ru_maxrss), wall_s,
    cpu_s (the child's user + system time) and other_load: the average number of cores that
    everything else on the machine kept busy meanwhile (from /proc/stat), a check that the
    timing was not disturbed.
    """
    log("+", " ".join(shlex.quote(str(c)) for c in cmd))
    with open(log_base + ".out", "w+b") as out, open(log_base + ".err", "w+b") as err:
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err)
        # wait4 reaps the child itself, so its resource usage is this child's alone.
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy1 = cpu_busy_s()
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu = ru.ru_utime + ru.ru_stime
        other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / max(wall, 1e-9))
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                {"peak_rss_kib": ru.ru_maxrss, "wall_s": wall, "cpu_s": cpu, "other_load": other})


def tail(text, n=15):
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------------------------
# 1. llama.cpp


def find_cmake():
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    c = shutil.which("cmake", path=path)
    if not c:
        sys.exit("cmake not found: `python -m pip install cmake` into this python's environment")
    return c


def build_llamacpp(a):
    if a.llama_bin:
        bindir = os.path.abspath(a.llama_bin)
    else:
        src_root = os.path.join(a.work, f"llama_cpp_python-{a.llama_cpp_python_version}")
        src = os.path.join(src_root, "vendor", "llama.cpp")
        bindir = os.path.join(src, "build", "bin")
    bins = {t: os.path.join(bindir, t) for t in TARGETS}
    if all(os.access(b, os.X_OK) for b in bins.values()):
        log(f"llama.cpp: using {bindir}")
        return bins
    if a.llama_bin:
        sys.exit(f"--llama-bin {bindir}: no {' / '.join(TARGETS)} there")
    if not os.path.isdir(src):
        sdist_dir = os.path.join(a.work, "sdist")
        os.makedirs(sdist_dir, exist_ok=True)
        name = f"llama_cpp_python-{a.llama_cpp_python_version}.tar.gz"
        sdist = os.path.join(sdist_dir, name)
        if not os.path.exists(sdist):
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                 f"llama-cpp-python=={a.llama_cpp_python_version}", "-d", sdist_dir])
        if not os.path.exists(sdist):
            sys.exit(f"pip download did not produce {sdist}")
        log(f"extracting {sdist}")
        tmp = tempfile.mkdtemp(dir=a.work, prefix="extract-")
        with tarfile.open(sdist) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:
                tf.extractall(tmp)
        os.replace(os.path.join(tmp, f"llama_cpp_python-{a.llama_cpp_python_version}"), src_root)
        os.rmdir(tmp)
    if not os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        sys.exit(f"{src}: no llama.cpp source (is vendor/llama.cpp in this sdist?)")
    cmake = find_cmake()
    build = os.path.join(src, "build")
    t0 = time.time()
    run(["nice", "-n", "10", cmake, "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON",
         "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=OFF",
         "-DGGML_CCACHE=OFF"])
    run(["nice", "-n", "10", cmake, "--build", build, "--config", "Release", "-j", str(a.jobs),
         "--target", *TARGETS])
    log(f"llama.cpp built in {time.time() - t0:.0f} s")
    for b in bins.values():
        if not os.access(b, os.X_OK):
            sys.exit(f"build finished but {b} is missing")
    return bins


# --------------------------------------------------------------------------------------------
# 2. GGUF


class Checkpoint:
    """Tensor index of a (sharded) safetensors checkpoint: name -> (file, dtype, shape, offset, nbytes)."""

    def __init__(self, model_dir):
        self.dir = model_dir
        idx_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(idx_path):
            with open(idx_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.files = [os.path.join(model_dir, f) for f in files]
        self.tensors = {}
        for path in self.files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.tensors[name] = (path, info["dtype"], tuple(info["shape"]), base + begin, end - begin)

    def stamp(self):
        return {"model_dir": os.path.realpath(self.dir),
                "files": [[os.path.basename(p), os.path.getsize(p), int(os.path.getmtime(p))] for p in self.files]}

    def find(self, *names):
        for n in names:
            if n in self.tensors:
                return n
        sys.exit(f"{self.dir}: none of {names} in the checkpoint")

    def raw(self, name):
        """(memmap of the stored bytes with a numpy dtype that has the same width, ggml type name)."""
        path, dtype, shape, off, nbytes = self.tensors[name]
        np_dtype, ggml = {"BF16": (np.uint16, "BF16"), "F16": (np.float16, "F16"),
                          "F32": (np.float32, "F32")}.get(dtype, (None, None))
        if np_dtype is None:
            sys.exit(f"{name}: dtype {dtype} not supported here (bf16/f16/f32 checkpoints only)")
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=off, shape=shape)
        assert arr.nbytes == nbytes, name
        return arr, ggml

    def f32(self, name):
        arr, ggml = self.raw(name)
        if ggml == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(arr, dtype=np.float32)


def tokenizer_metadata(model_dir, n_vocab, gguf):
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    model = tok["model"]
    if model.get("type") != "BPE":
        sys.exit(f"tokenizer.json: model type {model.get('type')}, expected BPE")
    tokens = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = text
            types[i] = gguf.TokenType.NORMAL
    for t in tok.get("added_tokens", []):
        i = t["id"]
        if i >= n_vocab:
            continue
        tokens[i] = t["content"]
        c = t["content"]
        special = t.get("special") or (c.startswith("<|") and c.endswith("|>"))
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    for i in range(n_vocab):
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    cfg = {}
    p = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return ids.get(v) if v else None

    return tokens, types, merges, {k: special_id(k + "_token") for k in ("bos", "eos", "unk", "pad")}, cfg


def write_gguf(a, ck, cfg, out_path):
    import gguf

    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    n_layer = cfg["num_hidden_layers"]
    head_dim = n_embd // n_head
    n_rot = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    max_pos = cfg["max_position_embeddings"]
    rs = cfg.get("rope_scaling") or {}
    orig_ctx = cfg.get("original_max_position_embeddings", rs.get("original_max_position_embeddings", max_pos))

    emb = ck.find("model.embed_tokens.weight")
    n_vocab = ck.tensors[emb][2][0]
    W = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    W.add_type("model")
    W.add_name(f"phi4mm decoder ({os.path.basename(os.path.normpath(ck.dir))})")
    W.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    W.add_context_length(max_pos)
    W.add_rope_scaling_orig_ctx_len(orig_ctx)
    W.add_embedding_length(n_embd)
    W.add_feed_forward_length(cfg["intermediate_size"])
    W.add_block_count(n_layer)
    W.add_head_count(n_head)
    W.add_head_count_kv(n_head_kv)
    W.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    W.add_rope_dimension_count(n_rot)
    W.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    W.add_sliding_window(0)

    long_f, short_f = rs.get("long_factor"), rs.get("short_factor")
    rope_type = (rs.get("type") or rs.get("rope_type") or "").lower()
    if long_f:
        if rope_type not in ("longrope", "su"):
            sys.exit(f"rope_scaling type {rope_type!r}: only longrope is handled here")
        if len(long_f) != n_rot // 2 or len(short_f or []) != n_rot // 2:
            sys.exit(f"rope factors must have {n_rot // 2} entries each")
        scale = max_pos / orig_ctx
        W.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1 else 1.0)

    tokens, types, merges, special, tok_cfg = tokenizer_metadata(ck.dir, n_vocab, gguf)
    W.add_tokenizer_model("gpt2")
    W.add_tokenizer_pre(a.tokenizer_pre)
    W.add_token_list(tokens)
    W.add_token_types(types)
    W.add_token_merges(merges)
    for key, fn in (("bos", W.add_bos_token_id), ("eos", W.add_eos_token_id), ("unk", W.add_unk_token_id),
                    ("pad", W.add_pad_token_id)):
        if special[key] is not None:
            fn(special[key])
    W.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    W.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
    if isinstance(tok_cfg.get("chat_template"), str):
        W.add_chat_template(tok_cfg["chat_template"])

    def linear(prefix):  # the base weight of a LoRA-wrapped linear (or of a plain one)
        return ck.find(f"{prefix}.base_layer.weight", f"{prefix}.weight")

    # (gguf name, source tensor name or None, float32 array for small/computed tensors)
    plan = [("token_embd.weight", emb, None)]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        plan += [
            (f"blk.{i}.attn_norm.weight", None, ck.f32(ck.find(p + "input_layernorm.weight"))),
            (f"blk.{i}.attn_qkv.weight", linear(p + "self_attn.qkv_proj"), None),
            (f"blk.{i}.attn_output.weight", linear(p + "self_attn.o_proj"), None),
            (f"blk.{i}.ffn_norm.weight", None, ck.f32(ck.find(p + "post_attention_layernorm.weight"))),
            (f"blk.{i}.ffn_up.weight", linear(p + "mlp.gate_up_proj"), None),
            (f"blk.{i}.ffn_down.weight", linear(p + "mlp.down_proj"), None),
        ]
    plan.append(("output_norm.weight", None, ck.f32(ck.find("model.norm.weight"))))
    if long_f:
        plan.append(("rope_factors_long.weight", None, np.asarray(long_f, dtype=np.float32)))
        plan.append(("rope_factors_short.weight", None, np.asarray(short_f, dtype=np.float32)))

    expect = {"attn_qkv": (n_embd + 2 * n_head_kv * head_dim, n_embd), "attn_output": (n_embd, n_embd),
              "ffn_up": (2 * cfg["intermediate_size"], n_embd), "ffn_down": (n_embd, cfg["intermediate_size"]),
              "token_embd": (n_vocab, n_embd)}
    ggml_types = {"BF16": gguf.GGMLQuantizationType.BF16, "F16": gguf.GGMLQuantizationType.F16,
                  "F32": gguf.GGMLQuantizationType.F32}
    for gname, src, arr in plan:
        if src is None:
            W.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes)
            continue
        _, dtype, shape, _, nbytes = ck.tensors[src]
        kind = gname.split(".")[-2]
        if kind in expect and shape != expect[kind]:
            sys.exit(f"{src}: shape {shape}, expected {expect[kind]}")
        np_dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[dtype]
        W.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, raw_dtype=ggml_types[dtype])

    W.write_header_to_file()
    W.write_kv_data_to_file()
    W.write_ti_data_to_file()
    total = sum(ck.tensors[s][4] if s else arr.nbytes for _, s, arr in plan)
    done, t0 = 0, time.time()
    for k, (gname, src, arr) in enumerate(plan):
        if src is not None:
            arr, _ = ck.raw(src)
        W.write_tensor_data(arr)
        done += arr.nbytes
        del arr  # unmap before the next tensor
        if k % 24 == 0 or k == len(plan) - 1:
            log(f"  {done / GIB:6.2f} / {total / GIB:.2f} GiB  ({time.time() - t0:.0f} s)")
    W.close()
    return len(plan)


def ensure_gguf(a, model_dir, cfg):
    ck = Checkpoint(model_dir)
    name = os.path.basename(os.path.normpath(model_dir))
    gdir = os.path.join(a.work, "gguf")
    os.makedirs(gdir, exist_ok=True)
    path = os.path.join(gdir, f"{name}-bf16.gguf")
    stamp_path = path + ".src.json"
    stamp = ck.stamp()
    if os.path.exists(path) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                log(f"GGUF: using {path}")
                return path, stamp
        log(f"GGUF: {path} was written from another checkpoint; writing it again")
    # Files derived from the old GGUF are stale too.
    own = [f"{name}-{q.lower()}{pure}.gguf{ext}" for q, _ in PRECISIONS.values() for pure in ("", "-pure")
           for ext in ("", ".ok", ".tmp", ".src.json")]
    for f in own:
        if os.path.exists(os.path.join(gdir, f)):
            os.remove(os.path.join(gdir, f))
    tmp = path + ".tmp"
    log(f"GGUF: writing {path}")
    t0 = time.time()
    n = write_gguf(a, ck, cfg, tmp)
    os.replace(tmp, path)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    log(f"GGUF: {n} tensors, {os.path.getsize(path) / GIB:.2f} GiB in {time.time() - t0:.0f} s")
    return path, stamp


# --------------------------------------------------------------------------------------------
# 3.-4. quantise, check


def ensure_quant(a, bins, bf16_path, qtype, logdir):
    if qtype == "BF16":
        return bf16_path
    suffix = f"{qtype.lower()}{'-pure' if a.quantize_pure else ''}"
    path = bf16_path[: -len("bf16.gguf")] + suffix + ".gguf"
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(bf16_path):
        return path
    tmp = path + ".tmp"
    cmd = ["nice", "-n", "10", bins["llama-quantize"]] + (["--pure"] if a.quantize_pure else []) + [
        bf16_path, tmp, qtype, str(a.jobs)]
    base = os.path.join(logdir, os.path.basename(path) + ".quantize")
    rc, _, err, info = run_measured(cmd, base)
    if rc != 0:
        sys.exit(f"llama-quantize failed (rc {rc}; {base}.err):\n{tail(err)}")
    os.replace(tmp, path)
    embd = next((ln.split("converting to")[-1].split("..")[0].strip() for ln in err.splitlines()
                 if "token_embd.weight" in ln and "converting to" in ln), "?")
    log(f"{qtype}: {os.path.getsize(path) / GIB:.2f} GiB in {info['wall_s']:.0f} s "
        f"(token_embd, also the output matrix: {embd})")
    return path


def check_gguf(a, bins, path, cfg, logdir):
    ok = path + ".ok"
    if os.path.exists(ok) and os.path.getmtime(ok) >= os.path.getmtime(path):
        return
    base = os.path.join(logdir, os.path.basename(path) + ".check")
    rc, out, err, _ = run_measured([bins["llama-bench"], "-v", "-m", path, "-p", "8", "-n", "2", "-t",
                                       str(a.threads), "-r", "1", "--no-warmup", "-o", "json"], base)
    if rc != 0:
        sys.exit(f"llama-bench could not run {path} (rc {rc}):\n{tail(err, 30)}")
    seen = {}
    for line in err.splitlines():
        if line.startswith("print_info:") and "=" in line:
            k, v = line[len("print_info:"):].split("=", 1)
            seen.setdefault(k.strip(), v.strip())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    want = {"arch": "phi3", "n_embd": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"],
            "n_head": cfg["num_attention_heads"], "n_head_kv": cfg["num_key_value_heads"],
            "n_rot": int(head_dim * cfg.get("partial_rotary_factor", 1.0)), "n_ff": cfg["intermediate_size"],
            "n_vocab": cfg["vocab_size"],
            "n_ctx_orig_yarn": cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"])}
    bad = [f"{k} = {seen.get(k)!r}, expected {v}" for k, v in want.items() if seen.get(k) != str(v)]
    if bad:
        sys.exit(f"{path}: llama.cpp loaded it with unexpected parameters ({base}.err):\n  " + "\n  ".join(bad))
    log(f"checked {os.path.basename(path)}: " + ", ".join(f"{k} {seen[k]}" for k in want))
    open(ok, "w").close()


# --------------------------------------------------------------------------------------------
# 5.-6. benchmark, report


def bench_llamacpp(a, bins, path, logbase):
    cmd = [bins["llama-bench"], "-m", path, "-p", str(a.prompt_tokens), "-n", str(a.gen_tokens), "-t",
           str(a.threads), "-r", "1", "-o", "json"]
    rc, out, err, info = run_measured(cmd, logbase)
    r = {"engine": "llama.cpp", "cmd": cmd, "rc": rc, **info,
         "weights_gib": os.path.getsize(path) / GIB, "prefill_tok_s": None, "decode_tok_s": None}
    if rc != 0:
        log(f"llama-bench failed (rc {rc}):\n{tail(err)}")
        return r
    try:
        tests = json.loads(out)
    except json.JSONDecodeError:
        log(f"llama-bench: output is not JSON:\n{tail(out)}")
        return r
    r["raw"] = tests
    for t in tests:
        if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
            r["prefill_tok_s"] = t["avg_ts"]
        elif t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
            r["decode_tok_s"] = t["avg_ts"]
        r["format"] = t.get("model_type")
    return r


def prepare_llamacpp(ap, a):
    """What the batched and serving comparisons start with: --work outside the repository, the
    phi4mm binary built, the checkpoint's config, the log folder, the llama.cpp build and the
    BF16 GGUF. Returns (config, log folder, binaries, BF16 GGUF path)."""
    if os.path.commonpath([a.work, ROOT]) == ROOT:
        ap.error(f"--work {a.work} is inside the repository; put it elsewhere")
    if not os.access(a.phi4mm, os.X_OK):
        ap.error(f"{a.phi4mm} not found: cargo build --release -p phi4mm-cli")
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    logdir = os.path.join(a.work, "logs")
    os.makedirs(logdir, exist_ok=True)
    bins = build_llamacpp(a)
    bf16, _ = ensure_gguf(a, a.model, cfg)
    return cfg, logdir, bins, bf16


def ensure_phi4mm_quant(a, quant):
    """phi4mm's own quantised copy of the checkpoint (`phi4mm quantize`), made once under --work."""
    out = os.path.join(a.work, "phi4mm", f"{os.path.basename(a.model.rstrip('/'))}-{quant}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    run(["nice", "-n", "10", a.phi4mm, "quantize", "--model", a.model, "--quant", quant, "--out", out,
         "--threads", str(a.jobs)])
    return out


def bench_phi4mm(a, quant, logbase):
    # bf16 runs the checkpoint itself; quantised formats run phi4mm's quantised file (mapped, as
    # llama.cpp maps its GGUF) unless --phi4mm-load-quant asks for quantising at load.
    if quant == "none" or a.phi4mm_load_quant:
        model, qargs = a.model, ["--quant", quant]
    else:
        model, qargs = ensure_phi4mm_quant(a, quant), []
    # Like llama-bench's separate pp and tg tests: prefill timed on a P-token prompt (one token
    # generated), decode timed on N tokens after a one-token prompt.
    base = [a.phi4mm, "bench", "--json", "--model", model, "--threads", str(a.threads), "--text-only"] + qargs
    pp = run_phi4mm_json(base + ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", "1"], logbase + "-pp")
    cmd = base + ["--prompt-tokens", "1", "--gen-tokens", str(a.gen_tokens)]
    rc, out, err, info = run_measured(cmd, logbase + "-tg")
    if pp is not None:
        info["peak_rss_kib"] = max(info["peak_rss_kib"], pp[1]["peak_rss_kib"])
    r = {"engine": "phi4mm", "cmd": cmd, "rc": rc, **info, "quant": quant,
         "weights_gib": None, "prefill_tok_s": None, "decode_tok_s": None}
    if rc != 0:
        log(f"phi4mm bench --quant {quant} failed (rc {rc}); shown as n/a:\n{tail(err)}")
        return r
    lines = out.strip().splitlines()
    try:
        rep = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        rep = None
    if not isinstance(rep, dict):
        log(f"phi4mm: last stdout line is not a JSON object:\n{tail(out)}")
        return r
    r.update(raw=rep, prefill_tok_s=pp[0].get("prefill_tok_s") if pp else None, decode_tok_s=rep.get("decode_tok_s"),
             weights_gib=rep.get("decoder_gib"), format=rep.get("format"))
    return r


def run_phi4mm_json(cmd, logbase):
    """One `phi4mm bench --json` run: (its report, run info), or None if it failed."""
    rc, out, err, info = run_measured(cmd, logbase)
    lines = out.strip().splitlines()
    if rc != 0 or not lines:
        log(f"phi4mm failed (rc {rc}):\n{tail(err)}")
        return None
    try:
        return json.loads(lines[-1]), info
    except json.JSONDecodeError:
        return None


def best(runs, key, fn=max):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return fn(vals) if vals else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(a, prec, qtype, runs):
    ll = [r for r in runs if r["engine"] == "llama.cpp"]
    ph = [r for r in runs if r["engine"] == "phi4mm"]
    P, N = a.prompt_tokens, a.gen_tokens
    lines = [f"### {prec}: llama.cpp {qtype} vs phi4mm --quant {ph[0]['quant'] if ph else '?'}"
             f" ({a.threads} threads, best of {a.rounds})", "",
             f"| engine | format | weights GiB | prefill tok/s (pp{P}) | decode tok/s (tg{N}) | peak RSS GiB |",
             "|---|---|---:|---:|---:|---:|"]
    agg = {}
    for name, rs in (("llama.cpp", ll), ("phi4mm", ph)):
        ok = [r for r in rs if r["rc"] == 0]
        g = agg[name] = {"prefill": best(ok, "prefill_tok_s"), "decode": best(ok, "decode_tok_s"),
                         "peak_rss_kib": best(ok, "peak_rss_kib"), "weights_gib": best(ok, "weights_gib"),
                         "format": next((r.get("format") for r in ok if r.get("format")), None)}
        rss = None if g["peak_rss_kib"] is None else g["peak_rss_kib"] * 1024 / GIB
        fmt_name = g["format"] or (qtype if name == "llama.cpp" else rs[0]["quant"] if rs else "")
        lines.append(f"| {name} | {fmt_name} | {fmt(g['weights_gib'], '.2f')} | {fmt(g['prefill'], '.2f')} | "
                     f"{fmt(g['decode'], '.2f')} | {fmt(rss, '.2f')} |")

    def ratio(k):
        x, y = agg["phi4mm"][k], agg["llama.cpp"][k]
        return None if x is None or not y else x / y

    rp, rd = ratio("prefill"), ratio("decode")
    rp, rd = (fmt(x, ".2f") + ("x" if x else "") for x in (rp, rd))
    lines.append(f"| phi4mm / llama.cpp | | | {rp} | {rd} | |")
    busy = [r for r in runs if (r.get("other_load") or 0) > BUSY_LOAD]
    if busy:
        worst = max(r["other_load"] for r in busy)
        lines += ["", f"Warning: other processes kept up to {worst:.1f} cores busy during {len(busy)} of these "
                  f"{len(runs)} runs; the timings are unreliable (llama.cpp's spinning threads suffer most)."]
    return "\n".join(lines), agg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory (official hub layout)")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "phi4mm-bench"),
                    help="where the sdist, llama.cpp build, GGUFs and logs go (outside the repository)")
    ap.add_argument("--llama-cpp-python-version", default=LLAMA_CPP_PYTHON_VERSION)
    ap.add_argument("--llama-bin", metavar="DIR", help="use llama-bench / llama-quantize from DIR instead of building")
    ap.add_argument("--jobs", type=int, default=2, help="build jobs and llama-quantize threads")
    ap.add_argument("--phi4mm", default=os.path.join(ROOT, "target", "release", "phi4mm"))
    ap.add_argument("--precisions", default="bf16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--phi4mm-q4k-as", default="q4_0", help="phi4mm --quant compared with llama.cpp's Q4_K_M")
    ap.add_argument("--phi4mm-load-quant", action="store_true",
                    help="quantise at load (phi4mm --quant) instead of running a `phi4mm quantize` file")
    ap.add_argument("--quantize-pure", action="store_true",
                    help="llama-quantize --pure: every matrix in the one type (token_embd too)")
    ap.add_argument("--tokenizer-pre", default="gpt-4o", help="tokenizer.ggml.pre written into the GGUF")
    ap.add_argument("--prepare-only", action="store_true", help="build, convert, quantise and check; no benchmark")
    ap.add_argument("--json-out", metavar="PATH", help="save every run's raw results here")
    a = ap.parse_args()

    a.model = os.path.abspath(a.model)
    a.work = os.path.abspath(os.path.expanduser(a.work))
    precs = [p.strip().lower() for p in a.precisions.split(",") if p.strip()]
    bad = [p for p in precs if p not in PRECISIONS]
    if bad or not precs:
        ap.error(f"--precisions: unknown {bad}; choose from {', '.join(PRECISIONS)}")
    if min(a.threads, a.prompt_tokens, a.gen_tokens, a.rounds, a.jobs) < 1:
        ap.error("--threads, --prompt-tokens, --gen-tokens, --rounds and --jobs must be positive")
    if os.path.commonpath([a.work, ROOT]) == ROOT:
        ap.error(f"--work {a.work} is inside the repository; put it elsewhere")
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    if not a.prepare_only and not os.access(a.phi4mm, os.X_OK):
        ap.error(f"{a.phi4mm} not found: cargo build --release -p phi4mm-cli")
    os.makedirs(a.work, exist_ok=True)
    logdir = os.path.join(a.work, "logs")
    os.makedirs(logdir, exist_ok=True)

    bins = build_llamacpp(a)
    bf16, stamp = ensure_gguf(a, a.model, cfg)
    files = {}
    for p in precs:
        files[p] = ensure_quant(a, bins, bf16, PRECISIONS[p][0], logdir)
        check_gguf(a, bins, files[p], cfg, logdir)
    if a.prepare_only:
        for p in precs:
            print(f"{p}: {files[p]} ({os.path.getsize(files[p]) / GIB:.2f} GiB)")
        return

    stamp_s = time.strftime("%Y%m%d-%H%M%S")
    results, tables = [], []
    for p in precs:
        qtype, quant = PRECISIONS[p]
        quant = quant or a.phi4mm_q4k_as
        runs = []
        for rnd in range(a.rounds):
            base = os.path.join(logdir, f"{stamp_s}-{p}-r{rnd}")
            for r in (bench_llamacpp(a, bins, files[p], base + "-llamacpp"), bench_phi4mm(a, quant, base + "-phi4mm")):
                r.update(precision=p, round=rnd)
                runs.append(r)
                log(f"  {p} round {rnd} {r['engine']}: prefill {fmt(r['prefill_tok_s'], '.2f')} tok/s, decode "
                    f"{fmt(r['decode_tok_s'], '.2f')} tok/s, peak RSS {r['peak_rss_kib'] / 1048576:.2f} GiB, "
                    f"{r['wall_s']:.0f} s, other load {fmt(r['other_load'], '.2f')} cores")
        t, agg = table(a, p, qtype, runs)
        tables.append(t)
        print(t + "\n", flush=True)
        results.append({"precision": p, "llamacpp_type": qtype, "phi4mm_quant": quant, "gguf": files[p],
                        "best": agg, "runs": runs})

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"model": a.model, "source": stamp, "llama_cpp_python": a.llama_cpp_python_version,
                       "threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                       "rounds": a.rounds, "results": results}, f, indent=1)
        log(f"wrote {a.json_out}")


if __name__ == "__main__":
    main()
