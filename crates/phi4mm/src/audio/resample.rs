//! Bringing audio to the model's rate (spec §5.1). Integer multiples of 16 kHz are decimated
//! exactly as the original extractor does — scipy's `resample_poly(x, 1, q)` with its default
//! Kaiser-windowed (β = 5) FIR, reproduced in f64 — because the model's output is sensitive to
//! the last bit of the waveform. 16 kHz and 8 kHz (the reference's fill-zero mode) are used as
//! they are. Every other rate goes through a high-quality FFT resampler to 16 kHz: a deliberate
//! departure, since the original decimates those by an integer and then treats them as 16 kHz
//! (they would play at the wrong speed).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::error::{Error, Result};

/// Model-rate audio: 16 kHz, or 8 kHz for the fill-zero feature mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelAudio {
    pub samples: Vec<f64>,
    pub sample_rate: u32,
}

/// Converts a decoded waveform to what the feature extractor takes.
pub fn to_model_rate(samples: &[f64], rate: u32) -> Result<ModelAudio> {
    let out = match rate {
        0 => return Err(Error::Media("audio sample rate is 0".into())),
        16_000 | 8_000 => samples.to_vec(),
        r if r > 16_000 && r % 16_000 == 0 => {
            return Ok(ModelAudio { samples: resample_poly_down(samples, (r / 16_000) as usize), sample_rate: 16_000 })
        }
        r => resample_fft(samples, r)?,
    };
    let sample_rate = if rate == 8_000 { 8_000 } else { 16_000 };
    Ok(ModelAudio { samples: out, sample_rate })
}

/// `scipy.signal.resample_poly(x, 1, q)` (zero padding at both ends, the default).
pub fn resample_poly_down(x: &[f64], q: usize) -> Vec<f64> {
    if q == 1 {
        return x.to_vec();
    }
    let half_len = 10 * q;
    let taps = firwin_kaiser(2 * half_len + 1, 1.0 / q as f64, 5.0);
    let n_in = x.len();
    let n_out = n_in.div_ceil(q);
    let n_pre_pad = q - half_len % q;
    let n_pre_remove = (half_len + n_pre_pad) / q;
    // h padded in front by n_pre_pad zeros; y[i] = Σ_j h[j]·x[i·q − j] (upfirdn, up = 1).
    let mut h = vec![0.0; n_pre_pad];
    h.extend_from_slice(&taps);
    let mut y = Vec::with_capacity(n_out);
    for i in n_pre_remove..n_pre_remove + n_out {
        let center = i * q;
        let j_lo = center.saturating_sub(n_in - 1);
        let j_hi = center.min(h.len() - 1);
        let mut acc = 0.0;
        if j_lo <= j_hi {
            for j in j_lo..=j_hi {
                acc += h[j] * x[center - j];
            }
        }
        y.push(acc);
    }
    y
}

/// `scipy.signal.firwin(n, cutoff, window=("kaiser", beta))`: windowed-sinc lowpass, scaled to
/// unit gain at DC. `cutoff` is relative to Nyquist.
fn firwin_kaiser(n: usize, cutoff: f64, beta: f64) -> Vec<f64> {
    let alpha = 0.5 * (n as f64 - 1.0);
    let i0b = bessel_i0(beta);
    let mut h: Vec<f64> = (0..n)
        .map(|i| {
            let m = i as f64 - alpha;
            let x = cutoff * m;
            let sinc = if x == 0.0 { 1.0 } else { (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x) };
            let r = (i as f64 - alpha) / alpha;
            let w = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / i0b;
            cutoff * sinc * w
        })
        .collect();
    let s: f64 = h.iter().sum();
    h.iter_mut().for_each(|v| *v /= s);
    h
}

/// Modified Bessel function of the first kind, order 0 (power series; exact to f64 for the
/// arguments a Kaiser window with β = 5 needs).
fn bessel_i0(x: f64) -> f64 {
    let q = x * x / 4.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..200 {
        term *= q / (k as f64 * k as f64);
        sum += term;
        if term < sum * 1e-18 {
            break;
        }
    }
    sum
}

/// Any other rate → 16 kHz with an FFT-based band-limited resampler.
fn resample_fft(x: &[f64], rate: u32) -> Result<Vec<f64>> {
    let err = |e: String| Error::Media(format!("cannot resample {rate} Hz audio to 16 kHz: {e}"));
    let mut r = Fft::<f64>::new(rate as usize, 16_000, 1024, 1, FixedSync::Both).map_err(|e| err(e.to_string()))?;
    let input = InterleavedSlice::new(x, 1, x.len()).map_err(|e| err(e.to_string()))?;
    let mut out = vec![0.0; r.process_all_needed_output_len(x.len())];
    let frames = out.len();
    let mut output = InterleavedSlice::new_mut(&mut out, 1, frames).map_err(|e| err(e.to_string()))?;
    let (_, produced) = r
        .process_all_into_buffer(&input, &mut output, x.len(), None)
        .map_err(|e| err(e.to_string()))?;
    out.truncate(produced);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firwin_matches_scipy_values() -> crate::error::Result<()> {
        // scipy.signal.firwin(61, 1/3, window=("kaiser", 5.0)): center tap and an edge tap.
        let h = firwin_kaiser(61, 1.0 / 3.0, 5.0);
        assert!((h.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((h[30] - h.iter().cloned().fold(f64::MIN, f64::max)).abs() < 1e-15);
        assert_eq!(h[0], h[60]);
        assert!((bessel_i0(5.0) - 27.239871823604442).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn decimation_keeps_length_and_a_low_tone() -> crate::error::Result<()> {
        let n = 48_000;
        let x: Vec<f64> = (0..n).map(|i| (2.0 * std::f64::consts::PI * 440.0 * i as f64 / 48_000.0).sin()).collect();
        let y = to_model_rate(&x, 48_000)?;
        assert_eq!((y.samples.len(), y.sample_rate), (16_000, 16_000));
        for (i, v) in y.samples.iter().enumerate().skip(100).take(15_800) {
            let want = (2.0 * std::f64::consts::PI * 440.0 * i as f64 / 16_000.0).sin();
            assert!((v - want).abs() < 2e-3, "sample {i}: {v} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn other_rates_are_resampled_to_16k() -> crate::error::Result<()> {
        let x: Vec<f64> = (0..44_100).map(|i| (2.0 * std::f64::consts::PI * 300.0 * i as f64 / 44_100.0).sin()).collect();
        let y = to_model_rate(&x, 44_100)?;
        assert_eq!(y.sample_rate, 16_000);
        assert!((y.samples.len() as i64 - 16_000).abs() <= 2, "{}", y.samples.len());
        // Same tone, same level, at most a fraction of a sample of delay.
        let want = |i: usize| (2.0 * std::f64::consts::PI * 300.0 * i as f64 / 16_000.0).sin();
        let err = (2000..14_000).map(|k| (y.samples[k] - want(k)).abs()).fold(0.0, f64::max);
        assert!(err < 0.03, "max error {err}");
        let rms = ((2000..14_000).map(|k| y.samples[k] * y.samples[k]).sum::<f64>() / 12_000.0).sqrt();
        assert!((rms - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-3, "rms {rms}");
        assert_eq!(to_model_rate(&x, 8_000)?.sample_rate, 8_000);
        assert!(to_model_rate(&x, 0).is_err());
        Ok(())
    }
}
