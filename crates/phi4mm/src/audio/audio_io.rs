//! Reading audio with symphonia: wav (8/16/24/32-bit int, float), flac, mp3, ogg/vorbis and
//! m4a/aac, from a path or bytes; channels averaged to mono; samples as f64 in [−1, 1] the way
//! soundfile gives them (int16 → x/32768). Size and duration limits apply before and during
//! decoding, and a decoder panic on a crafted file becomes an error.

use std::io::Cursor;
use std::path::Path;

use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::error::{Error, Result};

/// Limits for audio inputs.
#[derive(Debug, Clone, Copy)]
pub struct AudioLimits {
    pub max_file_bytes: u64,
    /// Longest accepted recording, in seconds.
    pub max_seconds: f64,
}

impl Default for AudioLimits {
    fn default() -> Self {
        AudioLimits {
            max_file_bytes: 1 << 30,
            max_seconds: 3.0 * 3600.0,
        }
    }
}

/// Mono audio at its original sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Waveform {
    pub samples: Vec<f64>,
    pub sample_rate: u32,
}

/// Reads and decodes an audio file.
pub fn load_audio(path: &Path, limits: &AudioLimits) -> Result<Waveform> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::Media(format!("cannot read audio {what}: {e}")))?;
    if meta.len() > limits.max_file_bytes {
        return Err(Error::Media(format!(
            "audio {what} is {} bytes, over the {}-byte limit",
            meta.len(),
            limits.max_file_bytes
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Media(format!("cannot read audio {what}: {e}")))?;
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    decode_named(bytes, ext.as_deref(), limits, &what)
}

/// Decodes audio held in memory.
pub fn decode_audio(bytes: Vec<u8>, limits: &AudioLimits) -> Result<Waveform> {
    decode_named(bytes, None, limits, "input")
}

fn decode_named(bytes: Vec<u8>, ext: Option<&str>, limits: &AudioLimits, what: &str) -> Result<Waveform> {
    let fail = |m: String| Error::Media(format!("audio {what}: {m}"));
    if bytes.is_empty() {
        return Err(fail("the file is empty (0 bytes)".into()));
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(fail(format!("{} bytes, over the {}-byte limit", bytes.len(), limits.max_file_bytes)));
    }
    let limits = *limits;
    let ext = ext.map(str::to_string);
    std::panic::catch_unwind(move || decode_inner(bytes, ext.as_deref(), &limits))
        .map_err(|_| fail("the decoder crashed on this file (corrupt or crafted)".into()))?
        .map_err(fail)
}

fn decode_inner(bytes: Vec<u8>, ext: Option<&str>, limits: &AudioLimits) -> std::result::Result<Waveform, String> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(e) = ext {
        hint.with_extension(e);
    }
    let mut format = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| format!("unrecognised or unsupported audio format ({e})"))?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| "no audio track".to_string())?;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| "no audio codec parameters".to_string())?
        .clone();
    let track_id = track.id;
    let declared_rate = params.sample_rate.unwrap_or(0);
    if params.sample_rate == Some(0) {
        return Err("sample rate is 0".into());
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| format!("unsupported codec ({e})"))?;
    let mut mono: Vec<f64> = Vec::new();
    let mut rate = declared_rate;
    let mut inter: Vec<f64> = Vec::new();
    let mut bad_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(symphonia::core::errors::Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("cannot read: {e}")),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            Err(symphonia::core::errors::Error::DecodeError(_)) => {
                bad_packets += 1;
                continue;
            }
            Err(e) => return Err(format!("cannot decode: {e}")),
        };
        rate = buf.spec().rate();
        let ch = buf.spec().channels().count().max(1);
        buf.copy_to_vec_interleaved(&mut inter);
        mono.extend(inter.chunks_exact(ch).map(|f| f.iter().sum::<f64>() / ch as f64));
        if rate > 0 && mono.len() as f64 / rate as f64 > limits.max_seconds {
            return Err(format!("longer than the {}-second limit", limits.max_seconds));
        }
    }
    if rate == 0 {
        return Err("sample rate is 0".into());
    }
    if mono.is_empty() {
        return Err(if bad_packets > 0 {
            format!("no decodable audio ({bad_packets} corrupt packets)")
        } else {
            "no audio samples (zero length)".into()
        });
    }
    Ok(Waveform { samples: mono, sample_rate: rate })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit PCM WAV file.
    pub(crate) fn wav(samples: &[i16], rate: u32, channels: u16) -> Vec<u8> {
        let data_len = (samples.len() * 2) as u32;
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data_len).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
        v.extend_from_slice(&(channels * 2).to_le_bytes());
        v.extend_from_slice(&16u16.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&data_len.to_le_bytes());
        for s in samples {
            v.extend_from_slice(&s.to_le_bytes());
        }
        v
    }

    #[test]
    fn int16_is_exact_and_stereo_is_averaged() -> crate::error::Result<()> {
        let w = decode_audio(wav(&[0, 16384, -32768, 32767], 16000, 1), &AudioLimits::default())?;
        assert_eq!(w.sample_rate, 16000);
        assert_eq!(w.samples, vec![0.0, 0.5, -1.0, 32767.0 / 32768.0]);
        let w = decode_audio(wav(&[100, 300, -50, 50], 48000, 2), &AudioLimits::default())?;
        assert_eq!(w.samples, vec![200.0 / 32768.0, 0.0]);
        Ok(())
    }

    /// A WAV file with raw little-endian sample bytes.
    fn wav_raw(format: u16, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut v = wav(&[], 16000, 1);
        v[20..22].copy_from_slice(&format.to_le_bytes());
        v[28..32].copy_from_slice(&(16000 * bits as u32 / 8).to_le_bytes());
        v[32..34].copy_from_slice(&(bits / 8).to_le_bytes());
        v[34..36].copy_from_slice(&bits.to_le_bytes());
        v[40..44].copy_from_slice(&(data.len() as u32).to_le_bytes());
        v[4..8].copy_from_slice(&(36 + data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn eight_24_32_bit_and_float_wav() -> crate::error::Result<()> {
        let lim = AudioLimits::default();
        // 8-bit is unsigned with 128 as zero.
        let w = decode_audio(wav_raw(1, 8, &[128, 192, 0]), &lim)?;
        assert_eq!(w.samples, vec![0.0, 0.5, -1.0]);
        // 24-bit: 0x400000 = 0.5.
        let w = decode_audio(wav_raw(1, 24, &[0, 0, 0x40, 0, 0, 0xC0]), &lim)?;
        assert_eq!(w.samples, vec![0.5, -0.5]);
        // 32-bit int: 0x40000000 = 0.5.
        let w = decode_audio(wav_raw(1, 32, &[0, 0, 0, 0x40, 0, 0, 0, 0xC0]), &lim)?;
        assert_eq!(w.samples, vec![0.5, -0.5]);
        // IEEE float 32.
        let data: Vec<u8> = [0.25f32, -0.75].iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = decode_audio(wav_raw(3, 32, &data), &lim)?;
        assert_eq!(w.samples, vec![0.25, -0.75]);
        Ok(())
    }

    #[test]
    fn bad_audio_is_a_clear_error() -> crate::error::Result<()> {
        let lim = AudioLimits::default();
        let msg = |r: Result<Waveform>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(decode_audio(vec![], &lim)).contains("empty"));
        assert!(msg(decode_audio(b"not audio at all, just text".to_vec(), &lim)).contains("unsupported"));
        let e = msg(decode_audio(wav(&[], 16000, 1), &lim));
        assert!(e.contains("zero length") || e.contains("no audio"), "{e}");
        let mut zero_rate = wav(&[1, 2, 3], 16000, 1);
        zero_rate[24..28].copy_from_slice(&0u32.to_le_bytes());
        let e = msg(decode_audio(zero_rate, &lim));
        assert!(!e.is_empty(), "a zero sample rate must fail");
        let mut absurd = wav(&[1, 2, 3, 4], 16000, 1);
        absurd[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        // A data chunk claiming 4 GiB holds 4 samples: decode what is there, never allocate
        // what the header claims.
        if let Ok(w) = decode_audio(absurd, &lim) {
            assert_eq!(w.samples.len(), 4);
        }
        let short = AudioLimits { max_seconds: 0.0001, ..lim };
        assert!(msg(decode_audio(wav(&[0; 1600], 16000, 1), &short)).contains("limit"));
        Ok(())
    }
}
