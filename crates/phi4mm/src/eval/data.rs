//! The JSON-lines sets that `phi4mm eval` and `phi4mm finetune` read, one example a line:
//! `{"audio": "clip.wav", "target": "the transcript"}`, with `"image"` for a picture,
//! either key also a list for several, and an optional `"instruction"` in place of the task's
//! default prompt. Media paths are relative to the data file's folder.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::{GenerateRequest, MediaInput, Message, PromptInput};

/// What a set asks of the model, and so which prompt and which metrics it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// Speech recognition: the model card's transcription prompt; WER and CER.
    Asr,
    /// Speech translation into a language: the model card's translation prompt; BLEU.
    Ast { language: Option<String> },
    /// Questions about images: every line brings its instruction; exact-match accuracy.
    Vqa,
}

impl Task {
    /// `asr`, `ast` or `vqa`; `ast` translates into `language` unless lines say otherwise.
    pub fn parse(s: &str, language: Option<&str>) -> Result<Self> {
        match s.trim() {
            "asr" => Ok(Task::Asr),
            "ast" => Ok(Task::Ast { language: language.map(str::to_string) }),
            "vqa" => Ok(Task::Vqa),
            other => Err(Error::Request(format!("unknown task `{other}` (use asr, ast or vqa)"))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Task::Asr => "asr",
            Task::Ast { .. } => "ast",
            Task::Vqa => "vqa",
        }
    }

    /// The instruction a line without one gets (the model card's wording).
    fn default_instruction(&self) -> std::result::Result<String, &'static str> {
        match self {
            Task::Asr => Ok("Transcribe the audio clip into text.".to_string()),
            Task::Ast { language: Some(l) } => Ok(format!("Translate the audio to {l}.")),
            Task::Ast { language: None } => Err("has no instruction and no target language was given (--translate-to)"),
            Task::Vqa => Err("has no instruction (the question to ask about the image)"),
        }
    }
}

/// One line of a set.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line number in its file (for messages).
    pub line: usize,
    pub audios: Vec<PathBuf>,
    pub images: Vec<PathBuf>,
    pub instruction: Option<String>,
    pub target: String,
}

impl Example {
    /// The request for `task`: the user turn of [`Example::user_prompt`] handed to `make` (which
    /// sets the generation settings), with this example's images and audios.
    pub fn request(&self, task: &Task, make: impl FnOnce(PromptInput) -> GenerateRequest) -> Result<GenerateRequest> {
        let mut req = make(PromptInput::Chat(vec![Message::new("user", self.user_prompt(task)?)]));
        req.audios = self.audios.iter().cloned().map(MediaInput::Path).collect();
        req.images = self.images.iter().cloned().map(MediaInput::Path).collect();
        Ok(req)
    }

    /// The user turn for `task`: the instruction with a placeholder for every image and audio
    /// it does not already name (images first, as the model card's prompts put them).
    pub fn user_prompt(&self, task: &Task) -> Result<String> {
        let instruction = match &self.instruction {
            Some(i) => i.clone(),
            None => task.default_instruction().map_err(|why| Error::Request(format!("line {} {why}", self.line)))?,
        };
        let mut prompt = String::new();
        for (kind, n) in [("image", self.images.len()), ("audio", self.audios.len())] {
            for i in 1..=n {
                let tag = format!("<|{kind}_{i}|>");
                if !instruction.contains(&tag) {
                    prompt.push_str(&tag);
                }
            }
        }
        prompt.push_str(&instruction);
        Ok(prompt)
    }
}

/// Reads a set, checking every line: valid JSON, a string `target`, media that exist.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Request(format!("cannot read {}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |why: String| Error::Request(format!("{} line {}: {why}", path.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| at("not a JSON object".into()))?;
        let target = match obj.get("target") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => return Err(at("needs a string \"target\" (the expected answer)".into())),
        };
        let instruction = match obj.get("instruction") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(at("\"instruction\" must be a string".into())),
        };
        let audios = media(obj.get("audio"), base).map_err(|w| at(format!("\"audio\" {w}")))?;
        let images = media(obj.get("image"), base).map_err(|w| at(format!("\"image\" {w}")))?;
        out.push(Example { line: i + 1, audios, images, instruction, target });
    }
    if out.is_empty() {
        return Err(Error::Request(format!("{} has no examples", path.display())));
    }
    Ok(out)
}

/// A media key: absent, a path or a list of paths, each resolved against `base` and present.
fn media(v: Option<&serde_json::Value>, base: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let names: Vec<&str> = match v {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().map(|x| x.as_str().ok_or("must be a path or a list of paths")).collect::<std::result::Result<_, _>>()?,
        Some(_) => return Err("must be a path or a list of paths".into()),
    };
    names
        .into_iter()
        .map(|n| {
            let p = base.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("names {}, which is not a file", p.display()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_task() {
        let ex = |inst: Option<&str>| Example { line: 3, audios: vec!["a.wav".into()], images: Vec::new(), instruction: inst.map(str::to_string), target: String::new() };
        assert_eq!(ex(None).user_prompt(&Task::Asr).unwrap(), "<|audio_1|>Transcribe the audio clip into text.");
        let fr = Task::Ast { language: Some("French".into()) };
        assert_eq!(ex(None).user_prompt(&fr).unwrap(), "<|audio_1|>Translate the audio to French.");
        assert_eq!(ex(Some("Say <|audio_1|> back")).user_prompt(&Task::Asr).unwrap(), "Say <|audio_1|> back");
        let err = ex(None).user_prompt(&Task::Ast { language: None }).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("--translate-to"), "{err}");
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("phi4mm-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.wav"), b"x").unwrap();
        let f = dir.join("set.jsonl");
        let read = |body: &str| {
            std::fs::write(&f, body).unwrap();
            read_examples(&f).map_err(|e| e.to_string())
        };
        let ok = read("{\"audio\": \"a.wav\", \"target\": \"hi\"}\n\n").unwrap();
        assert_eq!(ok[0].audios, vec![dir.join("a.wav")]);
        assert!(read("{\"audio\": \"b.wav\", \"target\": \"hi\"}").unwrap_err().contains("line 1: \"audio\" names"));
        assert!(read("{\"target\": \"x\"}\n{\"audio\": \"a.wav\"}").unwrap_err().contains("line 2: needs a string \"target\""));
        assert!(read("nope").unwrap_err().contains("not JSON"));
        assert!(read("\n").unwrap_err().contains("has no examples"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
