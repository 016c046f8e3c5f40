//! Log-mel features exactly as the original extractor computes them (spec §5.2): 25 ms frames
//! every 10 ms with no centring, per-frame pre-emphasis, ×32768, a symmetric Hamming window,
//! a 512-point FFT, power, the SpeechLib 80-bin mel matrix (fmax 7690 Hz), a floor of 1, then
//! the natural log. 8 kHz audio uses the fill-zero mode (200/80/256 and zero-filled upper
//! bins). Also the token count `⌈T/8⌉`.

use realfft::RealFftPlanner;

use crate::error::{Error, Result};
use crate::audio::resample::ModelAudio;

/// Mel bins.
pub const N_MELS: usize = 80;
const N_BINS: usize = 257;

/// `[T, 80]` log-mel features.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub frames: usize,
    pub data: Vec<f32>,
}

impl LogMel {
    /// Placeholder tokens for these features: `⌈T/8⌉` (spec §5.6).
    pub fn num_tokens(&self) -> usize {
        self.frames.div_ceil(8)
    }
}

/// (window, hop, fft size) of a feature mode.
fn framing(rate: u32) -> (usize, usize, usize) {
    if rate == 8_000 {
        (200, 80, 256)
    } else {
        (400, 160, 512)
    }
}

/// Number of feature frames for `n` samples at `rate`, or an error if too short.
pub fn num_frames(n: usize, rate: u32) -> Result<usize> {
    let (win, hop, _) = framing(rate);
    if n < win {
        return Err(Error::Media(format!(
            "audio is too short: {n} samples at {rate} Hz; at least {win} ({} ms) are needed",
            win * 1000 / rate as usize
        )));
    }
    Ok((n - win) / hop + 1)
}

/// The features of model-rate audio.
pub fn log_mel(audio: &ModelAudio) -> Result<LogMel> {
    let (win, hop, n_fft) = framing(audio.sample_rate);
    let frames = num_frames(audio.samples.len(), audio.sample_rate)?;
    let window: Vec<f64> = (0..win)
        .map(|k| 0.54 - 0.46 * (2.0 * std::f64::consts::PI * k as f64 / (win - 1) as f64).cos())
        .collect();
    let mel = mel_matrix();
    let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n_fft);
    let mut input = fft.make_input_vec();
    let mut spectrum = fft.make_output_vec();
    let mut power = vec![0f32; N_BINS];
    let mut data = Vec::with_capacity(frames * N_MELS);
    let mut frame = vec![0f32; win];
    for t in 0..frames {
        for (k, f) in frame.iter_mut().enumerate() {
            *f = audio.samples[t * hop + k] as f32;
        }
        // Pre-emphasis inside the frame; the first sample uses itself as its predecessor.
        input.iter_mut().for_each(|v| *v = 0.0);
        for k in 0..win {
            let prev = if k == 0 { frame[0] } else { frame[k - 1] };
            let e = (frame[k] - 0.97f32 * prev) * 32768.0f32;
            input[k] = window[k] * e as f64;
        }
        fft.process(&mut input, &mut spectrum)
            .map_err(|e| Error::Media(format!("FFT failed: {e}")))?;
        let bins = if audio.sample_rate == 8_000 { n_fft / 2 } else { N_BINS };
        power.iter_mut().for_each(|p| *p = 0.0);
        for (k, c) in spectrum.iter().take(bins).enumerate() {
            let (re, im) = (c.re as f32, c.im as f32);
            let mag = re.hypot(im);
            power[k] = mag * mag;
        }
        for row in mel.chunks_exact(N_BINS) {
            let e: f32 = row.iter().zip(&power).map(|(w, p)| w * p).sum();
            data.push((e.max(1.0) as f64).ln() as f32);
        }
    }
    Ok(LogMel { frames, data })
}

/// SpeechLib's mel filterbank `[80, 257]` for 16 kHz, n_fft 512, fmin 0, fmax 7690 (f32).
pub fn mel_matrix() -> Vec<f32> {
    let (fs, n_fft, fmax) = (16_000.0f64, 512.0f64, 7690.0f64);
    let mel = |f: f64| 1127.0 * (1.0 + f / 700.0).ln();
    let bin2mel = |k: usize| 1127.0 * (1.0 + k as f64 * fs / (n_fft * 700.0)).ln();
    let f2bin = |f: f64| ((f * n_fft / fs) + 0.5) as usize;
    let klo = f2bin(0.0) + 1;
    let khi = f2bin(fmax).max(klo);
    let (mlo, mhi) = (mel(0.0), mel(fmax));
    let n = N_MELS + 2;
    let step = (mhi - mlo) / (n - 1) as f64;
    let centers: Vec<f64> = (0..n).map(|i| if i == n - 1 { mhi } else { mlo + i as f64 * step }).collect();
    let ms = (mhi - mlo) / (N_MELS + 1) as f64;
    let mut m = vec![0f32; N_MELS * N_BINS];
    for j in 0..N_MELS {
        let (left, center, right) = (centers[j], centers[j + 1], centers[j + 2]);
        for k in klo..khi {
            let mb = bin2mel(k);
            if left < mb && mb < right {
                m[j * N_BINS + k] = (1.0 - (center - mb).abs() / ms) as f32;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mel_matrix_matches_spec() -> crate::error::Result<()> {
        let m = mel_matrix();
        // Filter 0 is bin 1 only, weight ≈ 0.5757; DC and bins ≥ 246 are always zero.
        let f0: Vec<(usize, f32)> = (0..N_BINS).filter(|&k| m[k] != 0.0).map(|k| (k, m[k])).collect();
        assert_eq!(f0.len(), 1);
        assert_eq!(f0[0].0, 1);
        assert!((f0[0].1 - 0.5757).abs() < 1e-3, "{}", f0[0].1);
        for j in 0..N_MELS {
            assert_eq!(m[j * N_BINS], 0.0);
            assert!((246..N_BINS).all(|k| m[j * N_BINS + k] == 0.0));
            assert!((0..N_BINS).any(|k| m[j * N_BINS + k] > 0.0), "filter {j} is empty");
        }
        Ok(())
    }

    #[test]
    fn token_counts_match_spec_examples() -> crate::error::Result<()> {
        for (n, tokens) in [(160_000, 125), (16_000, 13), (480_000, 375), (720_000, 563)] {
            assert_eq!(num_frames(n, 16_000)?.div_ceil(8), tokens, "{n} samples");
        }
        Ok(())
    }

    #[test]
    fn token_counts_and_short_audio() -> crate::error::Result<()> {
        assert_eq!(num_frames(160_000, 16_000)?, 998);
        assert!(num_frames(399, 16_000).unwrap_err().to_string().contains("too short"));
        let a = ModelAudio { samples: vec![0.0; 16_000], sample_rate: 16_000 };
        let f = log_mel(&a)?;
        assert_eq!((f.frames, f.num_tokens()), (98, 13));
        // Silence hits the floor: ln(1) = 0.
        assert!(f.data.iter().all(|&v| v == 0.0));
        let a8 = ModelAudio { samples: vec![0.0; 8_000], sample_rate: 8_000 };
        assert_eq!(log_mel(&a8)?.frames, 98);
        Ok(())
    }
}
