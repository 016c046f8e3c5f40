//! `phi4mm transcribe`: speech recognition, or transcription plus translation, with the model
//! card's task prompts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use phi4mm::{MediaInput, Message, PromptInput};

use crate::common::{stream_stdout, ModelArgs};
use crate::run::GenArgs;

#[derive(Args, Debug)]
pub struct TranscribeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Also translate into this language (e.g. French); the reply holds the transcript and the
    /// translation separated by `<sep>`.
    #[arg(long)]
    pub translate_to: Option<String>,
    /// Print one JSON object: transcript, translation, and the raw completion.
    #[arg(long)]
    pub json: bool,
    /// The audio file.
    pub file: PathBuf,
}

/// The model card's prompt for the task.
pub fn task_prompt(translate_to: Option<&str>) -> String {
    match translate_to {
        None => "<|audio_1|>Transcribe the audio clip into text.".to_string(),
        Some(lang) => format!(
            "<|audio_1|>Transcribe the audio to text, and then translate the audio to {lang}. \
             Use <sep> as a separator between the original transcript and the translation."
        ),
    }
}

pub fn run(a: TranscribeArgs) -> Result<()> {
    std::fs::File::open(&a.file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.file.display()))?;
    let (engine, _) = a.model.load()?;
    let prompt = task_prompt(a.translate_to.as_deref());
    let mut req = a.gen.request(PromptInput::Chat(vec![Message::new("user", prompt)]));
    req.audios = vec![MediaInput::Path(a.file.clone())];
    let c = engine.generate(&req, stream_stdout(a.json))?;
    if a.json {
        let (transcript, translation) = match c.text.split_once("<sep>") {
            Some((t, tr)) if a.translate_to.is_some() => (t.trim().to_string(), Some(tr.trim().to_string())),
            _ => (c.text.trim().to_string(), None),
        };
        println!(
            "{}",
            serde_json::json!({"transcript": transcript, "translation": translation, "completion": c})
        );
    } else {
        println!();
    }
    Ok(())
}
