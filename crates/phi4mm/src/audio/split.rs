//! Long recordings in pieces the length of the speech encoder's attention window, for
//! answers that carry times (a transcript's segments). Each piece goes back out as a 32-bit
//! float WAV: the decoded samples are kept exactly (16-bit and 24-bit sources are exact in
//! f32), and the library reads it like any other input. A recording no longer than one
//! piece is returned as its original bytes, so its answer is the same as the whole file's.
//! (The WAV header is 44 fixed bytes; writing it needs no library.)

use crate::audio::audio_io::{decode_audio, AudioLimits};
use crate::error::Result;

/// Seconds of audio per Conformer window: 500 frames of 80 ms (10 ms mel hop, ×8 subsampling).
pub const WINDOW_SECONDS: f64 = 40.0;

/// One piece of a recording.
#[derive(Debug, Clone)]
pub struct AudioPiece {
    /// Where it starts and ends in the recording, in seconds.
    pub start: f64,
    pub end: f64,
    /// The piece as an audio file.
    pub bytes: Vec<u8>,
}

/// The recording's duration in seconds and its pieces of at most `seconds` each.
pub fn split_audio(bytes: Vec<u8>, seconds: f64, limits: &AudioLimits) -> Result<(f64, Vec<AudioPiece>)> {
    let w = decode_audio(bytes.clone(), limits)?;
    let rate = w.sample_rate.max(1) as usize;
    let duration = w.samples.len() as f64 / rate as f64;
    let per = ((seconds * rate as f64) as usize).max(1);
    if w.samples.len() <= per {
        return Ok((duration, vec![AudioPiece { start: 0.0, end: duration, bytes }]));
    }
    let pieces = w
        .samples
        .chunks(per)
        .enumerate()
        .map(|(i, s)| {
            let start = (i * per) as f64 / rate as f64;
            AudioPiece { start, end: start + s.len() as f64 / rate as f64, bytes: float_wav(s, w.sample_rate) }
        })
        .collect();
    Ok((duration, pieces))
}

/// Mono 32-bit float WAV (`WAVE_FORMAT_IEEE_FLOAT`).
fn float_wav(samples: &[f64], rate: u32) -> Vec<u8> {
    let data = (samples.len() * 4) as u32;
    let mut out = Vec::with_capacity(44 + data as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 4).to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&32u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    for &s in samples {
        out.extend_from_slice(&(s as f32).to_le_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pieces_keep_the_samples_and_their_times() {
        let samples: Vec<f64> = (0..25_000).map(|i| ((i % 200) as f64 - 100.0) / 128.0).collect();
        let whole = float_wav(&samples, 8000);
        let (d, pieces) = split_audio(whole.clone(), 1.0, &AudioLimits::default()).unwrap();
        assert!((d - 3.125).abs() < 1e-9);
        assert_eq!(pieces.len(), 4);
        assert_eq!((pieces[3].start, pieces[3].end), (3.0, 3.125));
        let mut back = Vec::new();
        for p in &pieces {
            back.extend(decode_audio(p.bytes.clone(), &AudioLimits::default()).unwrap().samples);
        }
        assert_eq!(back, samples);
        // No longer than one piece: the original bytes.
        let (_, one) = split_audio(whole.clone(), 4.0, &AudioLimits::default()).unwrap();
        assert_eq!(one[0].bytes, whole);
    }
}
