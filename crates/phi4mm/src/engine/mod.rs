//! The only module that knows the order of the stages: request → chat template → tokenizer →
//! placeholder expansion → (media encoders) → embeddings → decoder with the mode's LoRA →
//! sampler → detokenizer. Also the one place that handles the LongRoPE crossing at 4096 tokens
//! the way the reference does: drop the cache once and re-prefill the whole sequence with the
//! long factors (spec §2.5).

pub mod request;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::audio::{AudioEncoder, AudioJob, Projector};
use crate::audio::audio_features::{log_mel, LogMel};
use crate::audio::audio_io::{decode_audio, load_audio, AudioLimits};
use crate::model::config::{GenerationConfig, ModelConfig};
use crate::audio::resample::to_model_rate;
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::model::encoder_config::VisionConfig;
use crate::model::hub::ModelFiles;
use crate::vision::image_io::{decode_image, load_image, ImageLimits, RgbImage};
use crate::vision::image_prep::{Layout, PreparedImage};
use crate::vision::{ImageJob, VisionEncoder};
use crate::text::prompt::{self, Mode};
use crate::decoder::kv_cache::KvFormat;
use crate::model::quant::QType;
use crate::scheduler::{Event, Scheduler, SchedulerOptions};
use crate::text::tokenizer::Tokenizer;
use crate::model::weights::{ProgressFn, Weights};

pub use crate::engine::request::{
    Completion, FinishReason, GenerateRequest, MediaInput, Prepared, PromptInput, Step, TokenInfo,
    Timings,
};

/// Called with (windows encoded, windows in total) while long audio is encoded.
pub type EncodeProgress = Box<dyn Fn(usize, usize) + Send + Sync>;

/// How to load a model.
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Quantise the decoder's projections to this format at load (CPU only). A checkpoint
    /// written by `phi4mm quantize` is used in its own format whatever this says.
    pub quant: Option<QType>,
    /// KV cache format: the activation dtype, or 8-bit (CPU).
    pub kv_cache: KvFormat,
    /// Load only what text needs: no image or audio encoder, no LoRA adapters.
    pub text_only: bool,
    /// Called with (bytes loaded, total bytes).
    pub progress: Option<ProgressFn>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::BF16,
            device: Device::Cpu,
            quant: None,
            kv_cache: KvFormat::Dense,
            text_only: false,
            progress: None,
        }
    }
}

/// A loaded model.
pub struct Engine {
    config: ModelConfig,
    gen_config: GenerationConfig,
    decoder: Decoder,
    vision: Option<VisionEncoder>,
    audio: Option<AudioEncoder>,
    audio_limits: AudioLimits,
    encode_progress: Option<EncodeProgress>,
    tokenizer: Tokenizer,
    dir: PathBuf,
    /// `dynamic_hd` of preprocessor_config.json.
    max_crops: usize,
    image_limits: ImageLimits,
}

/// The reference processor accepts at most this many crops per image.
pub const MAX_CROPS_LIMIT: usize = 64;
/// Most images (or video frames) in one request.
pub const MAX_IMAGES: usize = 64;

impl Engine {
    /// Loads the model in `dir` (see [`crate::model::hub::resolve_model`] for hub ids).
    /// The decoder's weight format (`bf16`, `q8_0`, `q4_0`, …).
    pub fn format(&self) -> String {
        self.decoder.format()
    }

    /// Bytes of the decoder's weights: (base incl. embedding and norms, LoRA adapters).
    pub fn decoder_bytes(&self) -> (usize, usize) {
        self.decoder.nbytes()
    }

    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self> {
        let files = ModelFiles::locate(dir)?;
        let mut config = ModelConfig::from_file(&files.config)?;
        // Validate the encoder descriptions now, so a bad config fails at load.
        let vision_cfg = VisionConfig::from_model_config(&config)?;
        let audio_cfg = crate::model::encoder_config::AudioConfig::from_model_config(&config)?;
        let max_crops = read_dynamic_hd(&dir.join("preprocessor_config.json"))?;
        let gen_config = GenerationConfig::from_file_or_default(&files.generation_config)?;
        let tokenizer = Tokenizer::load(&files.tokenizer, &files.tokenizer_config)?;
        let mut weights = Weights::open(&files.weights, &opts.device)?;
        if let Some(p) = opts.progress {
            weights = weights.with_progress(p);
        }
        if let (Some(file), Some(q)) = (weights.file_quant(), opts.quant) {
            if file != q.name() {
                return Err(Error::Request(format!(
                    "this checkpoint is already quantised to {file}; load it without --quant or quantise the original to {}",
                    q.name()
                )));
            }
        }
        if (opts.quant.is_some() || weights.file_quant().is_some()) && !opts.device.is_cpu() {
            return Err(Error::Request("quantised weight formats run on the CPU only; use --device cpu or no --quant".into()));
        }
        if opts.text_only {
            config.vision_lora = None;
            config.speech_lora = None;
        }
        let mut decoder = Decoder::load(&config, &weights, opts.dtype, &opts.device, opts.quant)?;
        decoder.set_kv_format(opts.kv_cache)?;
        let vision = if opts.text_only {
            None
        } else if VisionEncoder::present(&weights) {
            Some(VisionEncoder::load(&weights, &vision_cfg, config.hidden_size, opts.dtype, &opts.device)?)
        } else {
            tracing::warn!("the checkpoint has no image encoder: image input is disabled");
            None
        };
        let audio = if opts.text_only {
            None
        } else if AudioEncoder::present(&weights) {
            Some(AudioEncoder::load(&weights, &audio_cfg, config.hidden_size, opts.dtype, &opts.device)?)
        } else {
            tracing::warn!("the checkpoint has no audio encoder: audio input is disabled");
            None
        };
        let unused = weights.unused();
        let (enc, other): (Vec<_>, Vec<_>) = unused
            .iter()
            .partition(|n| n.starts_with("model.embed_tokens_extend."));
        tracing::debug!(
            encoder_tensors = enc.len(),
            "encoder tensors not loaded (unused layers, heads, or encoders not implemented yet)"
        );
        for n in other {
            tracing::debug!(tensor = %n, "unused tensor");
        }
        Ok(Engine {
            config,
            gen_config,
            decoder,
            vision,
            audio,
            audio_limits: AudioLimits::default(),
            encode_progress: None,
            tokenizer,
            dir: dir.to_path_buf(),
            max_crops,
            image_limits: ImageLimits::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `generation_config.json` (end-of-sequence ids).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.gen_config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Uses the adapter saved in `dir` (by `phi4mm finetune`, or PEFT in the same layout) as
    /// `adapter`, unmerged, in place of the checkpoint's, in the decoder's weight format.
    pub fn load_adapter(&mut self, adapter: crate::decoder::lora::Adapter, dir: &Path) -> Result<crate::model::adapter::AdapterInfo> {
        let (info, tensors) = crate::model::adapter::load(dir, adapter.name())?;
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        self.decoder.set_adapter(adapter, &map, info.alpha / info.rank as f64).map_err(|e| Error::Request(format!("adapter {}: {e}", dir.display())))?;
        Ok(info)
    }

    /// Frees `adapter`'s weights (a fine-tuning run that does not use them); requests of that
    /// mode fail afterwards.
    pub fn drop_adapter(&mut self, adapter: crate::decoder::lora::Adapter) {
        self.decoder.drop_adapter(adapter);
    }

    /// Frees the image encoder (a speech fine-tune); image requests fail afterwards.
    pub fn drop_vision_encoder(&mut self) {
        self.vision = None;
    }

    /// Frees the audio encoder (a vision fine-tune without audio); audio requests fail
    /// afterwards.
    pub fn drop_audio_encoder(&mut self) {
        self.audio = None;
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// Longest sequence (prompt + generation) the model supports.
    pub fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// Builds the input ids of a request: template, markers, placeholder expansion.
    pub fn prepare(&self, req: &GenerateRequest) -> Result<Prepared> {
        let text = match &req.prompt {
            PromptInput::Chat(msgs) => self.tokenizer.apply_chat_template(msgs, true)?,
            PromptInput::Raw(s) => s.clone(),
        };
        let (n_img, n_aud) = prompt::count_markers(&text);
        if n_img != req.images.len() || n_aud != req.audios.len() {
            return Err(Error::Request(format!(
                "the prompt has {n_img} image and {n_aud} audio marker(s) but {} image(s) and {} \
                 audio(s) were given",
                req.images.len(),
                req.audios.len()
            )));
        }
        let audios = self.prepare_audios(req)?;
        let audio_tokens: Vec<usize> = audios.iter().map(LogMel::num_tokens).collect();
        let ids = self.tokenizer.encode(&prompt::replace_markers(&text))?;
        let text_tokens = ids.len() - req.images.len() - req.audios.len();
        let (images, max_crops) =
            self.prepare_images(req, text_tokens + audio_tokens.iter().sum::<usize>())?;
        let image_tokens: Vec<usize> = images.iter().map(|i| i.num_tokens).collect();
        let ids = prompt::expand_placeholders(&ids, &image_tokens, &audio_tokens)?;
        Ok(Prepared {
            ids,
            mode: Mode::from_media(req.images.len(), req.audios.len()),
            images,
            max_crops,
            audios,
        })
    }

    /// Decodes every audio of the request, brings it to the model rate and computes features.
    fn prepare_audios(&self, req: &GenerateRequest) -> Result<Vec<LogMel>> {
        if req.audios.is_empty() {
            return Ok(Vec::new());
        }
        if self.audio.is_none() {
            return Err(Error::Unsupported("no audio encoder is loaded (the checkpoint has none, or the model was loaded text-only)".into()));
        }
        req.audios
            .iter()
            .map(|m| {
                let (w, name) = match m {
                    MediaInput::Path(p) => (load_audio(p, &self.audio_limits)?, p.display().to_string()),
                    MediaInput::Bytes(b) => (decode_audio(b.clone(), &self.audio_limits)?, "input".into()),
                };
                to_model_rate(&w.samples, w.sample_rate)
                    .and_then(|a| log_mel(&a))
                    .map_err(|e| Error::Media(format!("audio {name}: {e}")))
            })
            .collect()
    }

    /// Reports audio-encoder progress (windows done, total) to `f`.
    pub fn set_encode_progress(&mut self, f: EncodeProgress) {
        self.encode_progress = Some(f);
    }

    /// The audio encoder, if the checkpoint has one.
    pub fn audio(&self) -> Option<&AudioEncoder> {
        self.audio.as_ref()
    }

    /// Decodes and transforms every image of the request. Without an explicit `max_crops`,
    /// the per-image crop cap starts at the model's `dynamic_hd` and shrinks until the prompt
    /// (`other_tokens` of text and audio plus the images) and the generation fit the context —
    /// so many frames of a clip still fit. Returns the images and the cap used.
    fn prepare_images(
        &self,
        req: &GenerateRequest,
        other_tokens: usize,
    ) -> Result<(Vec<PreparedImage>, usize)> {
        if req.images.is_empty() {
            return Ok((Vec::new(), self.max_crops));
        }
        if self.vision.is_none() {
            return Err(Error::Unsupported("no image encoder is loaded (the checkpoint has none, or the model was loaded text-only)".into()));
        }
        if req.images.len() > MAX_IMAGES {
            return Err(Error::Request(format!(
                "{} images given; at most {MAX_IMAGES} per request",
                req.images.len()
            )));
        }
        let decoded: Vec<RgbImage> = req
            .images
            .iter()
            .map(|m| match m {
                MediaInput::Path(p) => load_image(p, &self.image_limits),
                MediaInput::Bytes(b) => decode_image(b, &self.image_limits),
            })
            .collect::<Result<_>>()?;
        let max_crops = match req.max_crops {
            Some(m) if m == 0 || m > MAX_CROPS_LIMIT => {
                return Err(Error::Request(format!(
                    "max_crops must be between 1 and {MAX_CROPS_LIMIT}, got {m}"
                )))
            }
            Some(m) => m,
            None => {
                let budget = self.max_context().saturating_sub(other_tokens + req.max_new_tokens);
                let total = |cap: usize| -> Result<usize> {
                    decoded.iter().map(|i| Ok(Layout::new(i.width, i.height, cap)?.num_tokens)).sum()
                };
                let mut cap = self.max_crops;
                while cap > 1 && total(cap)? > budget {
                    cap -= 1;
                }
                if cap < self.max_crops {
                    tracing::info!(cap, images = decoded.len(), "crop cap lowered so the prompt fits the context");
                }
                cap
            }
        };
        let images = decoded
            .iter()
            .map(|img| PreparedImage::new(img, max_crops))
            .collect::<Result<_>>()?;
        Ok((images, max_crops))
    }

    /// Runs a request, calling `on_step` for every generated token; `on_step` returns false to
    /// stop early.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: impl FnMut(&Step) -> bool,
    ) -> Result<Completion> {
        let prepared = self.prepare(req)?;
        self.generate_prepared(&prepared, req, on_step)
    }

    /// Generation from already prepared ids: the [`Scheduler`] with this one request (one
    /// code path for one request and many), so its results are those of the same request in
    /// any batch of a scheduler with the default prefill chunk.
    pub fn generate_prepared(
        &self,
        prepared: &Prepared,
        req: &GenerateRequest,
        mut on_step: impl FnMut(&Step) -> bool,
    ) -> Result<Completion> {
        let mut req = req.clone();
        req.return_logits = true;
        let mut sched = Scheduler::new(self, SchedulerOptions::single());
        let id = sched.submit_prepared(req, prepared.clone())?;
        sched.run_to_end(id, |e| match e {
            Event::Token { token, text, logits, .. } => on_step(&Step {
                id: token.id,
                text,
                logprob: token.logprob,
                top: &token.top,
                logits: logits.as_deref().unwrap_or(&[]),
            }),
            _ => true,
        })
    }

    /// Rejects an empty prompt, no room to generate, or a prompt + generation longer than the
    /// context.
    pub fn check_lengths(&self, prepared: &Prepared, req: &GenerateRequest) -> Result<()> {
        let ids = &prepared.ids;
        if ids.is_empty() {
            return Err(Error::Request("the prompt is empty".into()));
        }
        let max_new = req.max_new_tokens;
        if max_new == 0 {
            return Err(Error::Request("max_new_tokens must be at least 1".into()));
        }
        if ids.len() + max_new > self.max_context() {
            return Err(Error::Request(format!(
                "prompt has {} tokens and max_new_tokens is {max_new}: together {} exceed the \
                 model's {}-token context; shorten the prompt or lower max_new_tokens",
                ids.len(),
                ids.len() + max_new,
                self.max_context()
            )));
        }
        Ok(())
    }

    /// Token embeddings of the prompt with the media features written over the placeholder
    /// rows (spec §6.4).
    pub fn embed_prompt(&self, prepared: &Prepared) -> Result<Tensor> {
        let audio = self.encode_audios(prepared, None)?;
        let images = prepared.images.iter().map(|img| self.encode_image(img)).collect::<Result<Vec<_>>>()?;
        self.merge_media(prepared, audio.as_ref(), &images)
    }

    /// The projected features of every audio of the request, encoded together as the
    /// reference batches them (`None` without audio); `progress` and the engine's own
    /// [`Engine::set_encode_progress`] get (windows done, total).
    pub fn encode_audios(&self, prepared: &Prepared, progress: Option<&dyn Fn(usize, usize)>) -> Result<Option<Tensor>> {
        if prepared.audios.is_empty() {
            return Ok(None);
        }
        let both = |done: usize, total: usize| {
            self.encode_progress.iter().for_each(|f| f(done, total));
            progress.iter().for_each(|f| f(done, total));
        };
        let mut job = self.start_audios(prepared)?;
        Ok(Some(self.audio_encoder()?.finish(&prepared.audios, &mut job, Some(&both))?))
    }

    /// Starts encoding every audio of the request (see [`Engine::encode_audios`]); run it with
    /// [`Engine::advance_audios`], a piece at a time.
    pub fn start_audios(&self, prepared: &Prepared) -> Result<AudioJob> {
        let which = if prepared.mode == Mode::VisionSpeech { Projector::Vision } else { Projector::Speech };
        Ok(self.audio_encoder()?.start(&prepared.audios, Some(which)))
    }

    /// The next piece of `job`; the projected features of all audios after the last. The
    /// engine's [`Engine::set_encode_progress`] hears of every window finished.
    pub fn advance_audios(&self, prepared: &Prepared, job: &mut AudioJob) -> Result<Option<Tensor>> {
        let before = job.windows().0;
        let out = self.audio_encoder()?.advance(&prepared.audios, job)?;
        let (done, total) = job.windows();
        if done > before {
            self.encode_progress.iter().for_each(|f| f(done, total));
        }
        Ok(out)
    }

    fn audio_encoder(&self) -> Result<&AudioEncoder> {
        self.audio
            .as_ref()
            .ok_or_else(|| Error::Unsupported("no audio encoder is loaded (the checkpoint has none, or the model was loaded text-only)".into()))
    }

    /// The projected features of one prepared image.
    pub fn encode_image(&self, img: &PreparedImage) -> Result<Tensor> {
        self.image_encoder()?.encode(img)
    }

    /// Starts encoding `img`; run it with [`Engine::advance_image`], a piece at a time.
    pub fn start_image(&self, img: &PreparedImage) -> Result<ImageJob> {
        Ok(self.image_encoder()?.start(img))
    }

    /// The next piece of `job`; the image's projected features after the last.
    pub fn advance_image(&self, img: &PreparedImage, job: &mut ImageJob) -> Result<Option<Tensor>> {
        self.image_encoder()?.advance(img, job)
    }

    fn image_encoder(&self) -> Result<&VisionEncoder> {
        self.vision
            .as_ref()
            .ok_or_else(|| Error::Unsupported("no image encoder is loaded (the checkpoint has none, or the model was loaded text-only)".into()))
    }

    /// The prompt's token embeddings with the audio features and then each image's features
    /// written over their placeholder rows.
    pub fn merge_media(&self, prepared: &Prepared, audio: Option<&Tensor>, images: &[Tensor]) -> Result<Tensor> {
        let ids = &prepared.ids;
        let mut emb = self.decoder.embed(ids)?;
        if let Some(feats) = audio {
            emb = scatter_rows(&emb, ids, prompt::AUDIO_TOKEN_ID, &feats.to_dtype(emb.dtype())?)?;
        }
        if images.is_empty() {
            return Ok(emb);
        }
        let feats = Tensor::cat(images, 0)?.to_dtype(emb.dtype())?;
        scatter_rows(&emb, ids, prompt::IMAGE_TOKEN_ID, &feats)
    }

    /// The image encoder, if the checkpoint has one.
    pub fn vision(&self) -> Option<&VisionEncoder> {
        self.vision.as_ref()
    }
}

/// `emb` with the rows where `ids == token` replaced, in order, by the rows of `feats`.
fn scatter_rows(emb: &Tensor, ids: &[u32], token: u32, feats: &Tensor) -> Result<Tensor> {
    let want = ids.iter().filter(|&&t| t == token).count();
    if feats.dim(0)? != want {
        return Err(Error::Media(format!(
            "{} feature rows for {want} placeholder tokens",
            feats.dim(0)?
        )));
    }
    let mut pieces = Vec::new();
    let (mut i, mut f) = (0, 0);
    while i < ids.len() {
        let is_media = ids[i] == token;
        let run = ids[i..].iter().take_while(|&&t| (t == token) == is_media).count();
        pieces.push(if is_media { feats.narrow(0, f, run)? } else { emb.narrow(0, i, run)? });
        if is_media {
            f += run;
        }
        i += run;
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

/// `dynamic_hd` from preprocessor_config.json (36 when the file or key is absent).
fn read_dynamic_hd(path: &Path) -> Result<usize> {
    if !path.exists() {
        return Ok(36);
    }
    let v: serde_json::Value = crate::model::config::read_json(path)?;
    match v.get("dynamic_hd") {
        None => Ok(36),
        Some(x) => x.as_u64().filter(|&n| n >= 1).map(|n| n as usize).ok_or_else(|| Error::BadJson {
            path: path.to_path_buf(),
            message: format!("dynamic_hd must be a positive integer, got {x}"),
        }),
    }
}
