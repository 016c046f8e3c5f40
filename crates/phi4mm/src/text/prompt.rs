//! From a request's text to the decoder's input ids (spec §6.2–6.3): media markers
//! `<|image_N|>` / `<|audio_N|>` become the placeholder tokens, and each placeholder is expanded
//! to as many copies as its image or audio has feature vectors. Also the request's mode, which
//! picks the LoRA adapter (spec §3.3).

use crate::error::{Error, Result};
use crate::decoder::lora::Adapter;

/// Image placeholder id (`<|endoftext10|>`).
pub const IMAGE_TOKEN_ID: u32 = 200_010;
/// Audio placeholder id (`<|endoftext11|>`).
pub const AUDIO_TOKEN_ID: u32 = 200_011;
/// Image placeholder text.
pub const IMAGE_TOKEN: &str = "<|endoftext10|>";
/// Audio placeholder text.
pub const AUDIO_TOKEN: &str = "<|endoftext11|>";

/// What a request carries, which decides the decoder's adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Text,
    Vision,
    Speech,
    VisionSpeech,
}

impl Mode {
    /// The mode of a request with this many images and audios (spec §3.3).
    pub fn from_media(images: usize, audios: usize) -> Mode {
        match (images > 0, audios > 0) {
            (false, false) => Mode::Text,
            (true, false) => Mode::Vision,
            (false, true) => Mode::Speech,
            (true, true) => Mode::VisionSpeech,
        }
    }

    /// The LoRA adapter for the mode: vision whenever an image is present, speech for audio
    /// only, none for text.
    pub fn adapter(self) -> Option<Adapter> {
        match self {
            Mode::Text => None,
            Mode::Vision | Mode::VisionSpeech => Some(Adapter::Vision),
            Mode::Speech => Some(Adapter::Speech),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Text => "text",
            Mode::Vision => "vision",
            Mode::Speech => "speech",
            Mode::VisionSpeech => "vision_speech",
        }
    }
}

/// Counts `<|image_N|>` and `<|audio_N|>` markers in `text`.
pub fn count_markers(text: &str) -> (usize, usize) {
    (find_markers(text, "image").len(), find_markers(text, "audio").len())
}

/// Byte ranges of `<|{kind}_{digits}|>` in `text`.
fn find_markers(text: &str, kind: &str) -> Vec<(usize, usize)> {
    let open = format!("<|{kind}_");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(off) = text[from..].find(&open) {
        let start = from + off;
        let digits_at = start + open.len();
        let digits = text[digits_at..].bytes().take_while(u8::is_ascii_digit).count();
        let end = digits_at + digits;
        if digits > 0 && text[end..].starts_with("|>") {
            out.push((start, end + 2));
            from = end + 2;
        } else {
            from = digits_at;
        }
    }
    out
}

/// Replaces every `<|image_N|>` by the image placeholder and `<|audio_N|>` by the audio one.
/// As in the reference, N is ignored: the i-th marker binds the i-th image (or audio).
pub fn replace_markers(text: &str) -> String {
    let mut s = text.to_string();
    for (kind, token) in [("image", IMAGE_TOKEN), ("audio", AUDIO_TOKEN)] {
        let ranges = find_markers(&s, kind);
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for (a, b) in ranges {
            out.push_str(&s[last..a]);
            out.push_str(token);
            last = b;
        }
        out.push_str(&s[last..]);
        s = out;
    }
    s
}

/// A user message for `images` images and `audios` audios: the text as is when it already
/// holds markers (their counts must match the media), else image markers then audio markers
/// placed before it.
pub fn user_content(text: &str, images: usize, audios: usize) -> Result<String> {
    let (mi, ma) = count_markers(text);
    if mi == 0 && ma == 0 {
        let mut s = String::new();
        for i in 1..=images {
            s.push_str(&format!("<|image_{i}|>"));
        }
        for i in 1..=audios {
            s.push_str(&format!("<|audio_{i}|>"));
        }
        s.push_str(text);
        return Ok(s);
    }
    check_counts(mi, images, "image")?;
    check_counts(ma, audios, "audio")?;
    Ok(text.to_string())
}

fn check_counts(markers: usize, media: usize, kind: &str) -> Result<()> {
    if markers != media {
        return Err(Error::Request(format!(
            "the prompt has {markers} <|{kind}_N|> marker(s) but {media} {kind}(s) were given"
        )));
    }
    Ok(())
}

/// Expands the i-th image placeholder to `image_tokens[i]` copies and the i-th audio
/// placeholder to `audio_tokens[i]` copies (spec §6.3). The placeholder counts must match.
pub fn expand_placeholders(
    ids: &[u32],
    image_tokens: &[usize],
    audio_tokens: &[usize],
) -> Result<Vec<u32>> {
    let n_img = ids.iter().filter(|&&t| t == IMAGE_TOKEN_ID).count();
    let n_aud = ids.iter().filter(|&&t| t == AUDIO_TOKEN_ID).count();
    check_counts(n_img, image_tokens.len(), "image")?;
    check_counts(n_aud, audio_tokens.len(), "audio")?;
    let extra: usize = image_tokens.iter().chain(audio_tokens).sum();
    let mut out = Vec::with_capacity(ids.len() + extra);
    let (mut i, mut a) = (0, 0);
    for &t in ids {
        let copies = match t {
            IMAGE_TOKEN_ID => {
                i += 1;
                image_tokens[i - 1]
            }
            AUDIO_TOKEN_ID => {
                a += 1;
                audio_tokens[a - 1]
            }
            _ => {
                out.push(t);
                continue;
            }
        };
        out.extend(std::iter::repeat_n(t, copies));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_replaced_in_order_ignoring_numbers() -> crate::error::Result<()> {
        let s = replace_markers("<|image_2|>a<|audio_1|>b<|image_1|><|image_x|>");
        assert_eq!(
            s,
            "<|endoftext10|>a<|endoftext11|>b<|endoftext10|><|image_x|>"
        );
        assert_eq!(count_markers("<|image_1|><|image_12|><|audio_3|>"), (2, 1));
        Ok(())
    }

    #[test]
    fn content_without_markers_puts_images_then_audio_first() -> crate::error::Result<()> {
        assert_eq!(user_content("hi", 2, 1)?, "<|image_1|><|image_2|><|audio_1|>hi");
        assert!(user_content("<|image_1|>hi", 2, 0).is_err());
        Ok(())
    }

    #[test]
    fn expansion_by_count() -> crate::error::Result<()> {
        let ids = [1, IMAGE_TOKEN_ID, 2, AUDIO_TOKEN_ID, IMAGE_TOKEN_ID];
        let out = expand_placeholders(&ids, &[2, 3], &[1])?;
        assert_eq!(
            out,
            vec![1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 2, AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]
        );
        assert!(expand_placeholders(&ids, &[2], &[1]).is_err());
        Ok(())
    }

    #[test]
    fn modes_pick_adapters() -> crate::error::Result<()> {
        assert_eq!(Mode::from_media(0, 0).adapter(), None);
        assert_eq!(Mode::from_media(1, 0).adapter(), Some(Adapter::Vision));
        assert_eq!(Mode::from_media(0, 2).adapter(), Some(Adapter::Speech));
        assert_eq!(Mode::from_media(1, 1).adapter(), Some(Adapter::Vision));
        Ok(())
    }
}
