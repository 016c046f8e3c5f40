//! The dynamic-HD image transform of the original processor (spec §4.1): pick a crop grid,
//! resize onto a `448·gw × 448·gh` canvas with Pillow's bilinear filter (bit-exact), pad white
//! on the right or bottom, normalise to [−1, 1], build the patch-validity mask, make a 448×448
//! bicubic thumbnail of the padded canvas, and cut the canvas into row-major 448×448 crops.

use crate::error::{Error, Result};
use crate::vision::image_io::RgbImage;

/// Crop side in pixels.
pub const CROP: usize = 448;
/// Patch side in pixels.
pub const PATCH: usize = 14;
/// Patches per crop side.
pub const GRID: usize = CROP / PATCH;

/// One image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Crop grid (columns, rows).
    pub grid: (usize, usize),
    /// The resized, padded 8-bit canvas (`448·gw × 448·gh`).
    pub canvas: RgbImage,
    /// Patch-validity mask `[32·gh, 32·gw]`, 1 = real image.
    pub mask: Vec<u8>,
    /// Number of placeholder tokens (feature vectors).
    pub num_tokens: usize,
}

/// Where an image of a given size lands (spec §4.1, §4.5): crop grid, resized size, canvas size
/// and token count. Needs only the dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Crop grid (columns, rows).
    pub grid: (usize, usize),
    /// Size after resizing, before padding.
    pub resized: (usize, usize),
    /// Placeholder tokens: `273 + Uh·(Uw+1)`.
    pub num_tokens: usize,
}

impl Layout {
    /// The layout of a `width × height` image with at most `max_crops` crops.
    pub fn new(width: usize, height: usize, max_crops: usize) -> Result<Self> {
        let (w, h) = (width, height);
        if w == 0 || h == 0 {
            return Err(Error::Media(format!("image has zero size ({w}×{h})")));
        }
        let (gw, gh) = crop_grid(w, h, max_crops);
        let (tw, th) = (CROP * gw, CROP * gh);
        let (rw, rh) = (tw as f64 / w as f64, th as f64 / h as f64);
        // Python's int() of the f64 product: truncation.
        let (nw, nh) = if rw < rh {
            (tw, (h as f64 * rw) as usize)
        } else {
            ((w as f64 * rh) as usize, th)
        };
        if nw < 10 || nh < 10 {
            return Err(Error::Media(format!(
                "image of {w}×{h} would be resized to {nw}×{nh}: under 10 px; too thin to use"
            )));
        }
        let rows = GRID * gh - (th - nh) / PATCH;
        let cols = GRID * gw - (tw - nw) / PATCH;
        let (uh, uw) = (rows.div_ceil(2), cols.div_ceil(2));
        Ok(Layout { grid: (gw, gh), resized: (nw, nh), num_tokens: 273 + uh * (uw + 1) })
    }
}

/// The `(columns, rows)` crop grid of spec §4.1.
pub fn crop_grid(width: usize, height: usize, max_crops: usize) -> (usize, usize) {
    let (wc, hc) = (width.div_ceil(CROP), height.div_ceil(CROP));
    if wc * hc <= max_crops {
        return (wc, hc);
    }
    let mut cands: Vec<(usize, usize)> = Vec::new();
    for n in 1..=max_crops {
        for i in 1..=n {
            if n % i == 0 {
                cands.push((i, n / i));
            }
        }
    }
    // Ascending by product; within a product by columns (the reference's set order only
    // matters in exact ties between different ratios).
    cands.sort_by_key(|&(i, j)| (i * j, i));
    let aspect = width as f64 / height as f64;
    let area = (width * height) as f64;
    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for (i, j) in cands {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && area > 0.5 * (CROP * CROP * i * j) as f64 {
            best = (i, j);
        }
    }
    best
}

impl PreparedImage {
    /// Runs the transform with at most `max_crops` crops.
    pub fn new(img: &RgbImage, max_crops: usize) -> Result<Self> {
        let layout = Layout::new(img.width, img.height, max_crops)?;
        let (gw, gh) = layout.grid;
        let (tw, th) = (CROP * gw, CROP * gh);
        let (nw, nh) = layout.resized;
        let resized = resize_bilinear(img, nw, nh);
        let mut canvas = RgbImage { width: tw, height: th, data: vec![255; tw * th * 3] };
        for y in 0..nh {
            canvas.data[y * tw * 3..y * tw * 3 + nw * 3]
                .copy_from_slice(&resized.data[y * nw * 3..(y + 1) * nw * 3]);
        }
        let (mw, mh) = (GRID * gw, GRID * gh);
        let (pad_cols, pad_rows) = ((tw - nw) / PATCH, (th - nh) / PATCH);
        let mut mask = vec![1u8; mw * mh];
        for r in 0..mh {
            for c in 0..mw {
                if r >= mh - pad_rows || c >= mw - pad_cols {
                    mask[r * mw + c] = 0;
                }
            }
        }
        Ok(PreparedImage {
            grid: (gw, gh),
            canvas,
            mask,
            num_tokens: layout.num_tokens,
        })
    }

    /// Number of local crops.
    pub fn crops(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// The normalised canvas `[3, TH, TW]`.
    pub fn normalized(&self) -> Vec<f32> {
        let (w, h) = (self.canvas.width, self.canvas.height);
        let mut out = vec![0f32; 3 * w * h];
        for (i, px) in self.canvas.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * w * h + i] = normalize(px[c]);
            }
        }
        out
    }

    /// Tower input `[1 + crops, 3, 448, 448]`: the global thumbnail, then the crops row-major.
    pub fn pixel_values(&self) -> Vec<f32> {
        let (w, h) = (self.canvas.width, self.canvas.height);
        let norm = self.normalized();
        let mut out = bicubic(&norm, 3, h, w, CROP, CROP);
        out.reserve(self.crops() * 3 * CROP * CROP);
        for gy in 0..self.grid.1 {
            for gx in 0..self.grid.0 {
                for c in 0..3 {
                    for y in 0..CROP {
                        let row = c * w * h + (gy * CROP + y) * w + gx * CROP;
                        out.extend_from_slice(&norm[row..row + CROP]);
                    }
                }
            }
        }
        out
    }

    /// Per-crop masks `[1 + crops, 32, 32]` (all ones for the thumbnail).
    pub fn crop_masks(&self) -> Vec<u8> {
        let mw = GRID * self.grid.0;
        let mut out = vec![1u8; GRID * GRID];
        for gy in 0..self.grid.1 {
            for gx in 0..self.grid.0 {
                for r in 0..GRID {
                    let row = (gy * GRID + r) * mw + gx * GRID;
                    out.extend_from_slice(&self.mask[row..row + GRID]);
                }
            }
        }
        out
    }
}

/// `(x/255 − 0.5)/0.5` in f32, as torchvision's ToTensor + Normalize.
fn normalize(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling coefficients for one axis (`precompute_coeffs` with the bilinear
/// filter, support 1): per output pixel the first input index, the count, and fixed-point
/// weights.
fn coeffs(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 × filterscale
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            *wx = (1.0 - t.abs()).max(0.0);
            total += *wx;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((w, h), BILINEAR)` on an RGB image, bit for bit: horizontal pass
/// then vertical pass, 22-bit fixed-point weights, rounding and clipping as `clip8`.
pub fn resize_bilinear(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (iw, ih) = (img.width, img.height);
    let horiz = out_w != iw;
    let vert = out_h != ih;
    let (hb, hk, hks) = coeffs(iw, out_w);
    let (vb, vk, vks) = coeffs(ih, out_h);
    // Rows of the source the vertical pass reads.
    let (first, last) = if vert {
        (vb[0].0, vb[out_h - 1].0 + vb[out_h - 1].1)
    } else {
        (0, ih)
    };
    let tmp = if horiz {
        let rows = last - first;
        let mut t = vec![0u8; out_w * rows * 3];
        for y in 0..rows {
            let src = &img.data[(y + first) * iw * 3..(y + first + 1) * iw * 3];
            for (xx, &(xmin, n)) in hb.iter().enumerate() {
                let k = &hk[xx * hks..xx * hks + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &src[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        ss[c] += p[c] as i32 * kx;
                    }
                }
                for c in 0..3 {
                    t[(y * out_w + xx) * 3 + c] = clip8(ss[c]);
                }
            }
        }
        RgbImage { width: out_w, height: rows, data: t }
    } else {
        RgbImage {
            width: iw,
            height: last - first,
            data: img.data[first * iw * 3..last * iw * 3].to_vec(),
        }
    };
    if !vert {
        return tmp;
    }
    let w = tmp.width;
    let mut out = vec![0u8; w * out_h * 3];
    for (yy, &(ymin, n)) in vb.iter().enumerate() {
        let k = &vk[yy * vks..yy * vks + n];
        let ymin = ymin - first;
        for xx in 0..w {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate() {
                let p = &tmp.data[((ymin + y) * w + xx) * 3..((ymin + y) * w + xx) * 3 + 3];
                for c in 0..3 {
                    ss[c] += p[c] as i32 * ky;
                }
            }
            for c in 0..3 {
                out[(yy * w + xx) * 3 + c] = clip8(ss[c]);
            }
        }
    }
    RgbImage { width: w, height: out_h, data: out }
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` without antialias (a = −0.75,
/// edge indices clamped), on `[c, h, w]` f32 data → `[c, oh, ow]`.
pub fn bicubic(src: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let axis = |insz: usize, outsz: usize| -> Vec<([usize; 4], [f32; 4])> {
        let scale = insz as f32 / outsz as f32;
        (0..outsz)
            .map(|o| {
                let real = scale * (o as f32 + 0.5) - 0.5;
                let i0 = real.floor();
                let t = real - i0;
                let idx = |d: i64| (i0 as i64 + d).clamp(0, insz as i64 - 1) as usize;
                ([idx(-1), idx(0), idx(1), idx(2)], cubic_weights(t))
            })
            .collect()
    };
    let ys = axis(h, oh);
    let xs = axis(w, ow);
    let mut out = vec![0f32; c * oh * ow];
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for (oy, (yi, wy)) in ys.iter().enumerate() {
            for (ox, (xi, wx)) in xs.iter().enumerate() {
                let mut acc = 0f32;
                for j in 0..4 {
                    let row = &plane[yi[j] * w..];
                    let mut r = 0f32;
                    for i in 0..4 {
                        r += wx[i] * row[xi[i]];
                    }
                    acc += wy[j] * r;
                }
                out[ch * oh * ow + oy * ow + ox] = acc;
            }
        }
    }
    out
}

fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_spec_examples() -> crate::error::Result<()> {
        for (w, h, n) in [
            (1280, 720, 1596),
            (1344, 896, 1841),
            (448, 448, 545),
            (500, 300, 721),
            (640, 480, 1065),
            (1920, 1080, 3918),
            (3000, 4000, 3409),
            (4000, 300, 1868),
            (8000, 1000, 8497),
        ] {
            assert_eq!(Layout::new(w, h, 36)?.num_tokens, n, "{w}x{h}");
        }
        Ok(())
    }

    #[test]
    fn spec_example_1280x720() -> crate::error::Result<()> {
        let img = RgbImage { width: 1280, height: 720, data: vec![0; 1280 * 720 * 3] };
        let p = PreparedImage::new(&img, 36)?;
        assert_eq!(p.grid, (3, 2));
        assert_eq!((p.canvas.width, p.canvas.height), (1344, 896));
        assert_eq!(p.num_tokens, 1596);
        // 10 bottom mask rows are padding; white padding normalises to +1.
        assert_eq!(p.mask.iter().filter(|&&m| m == 0).count(), 10 * 96);
        assert_eq!(p.canvas.data[(890 * 1344) * 3], 255);
        assert_eq!(p.pixel_values().len(), 7 * 3 * 448 * 448);
        assert_eq!(p.crop_masks().len(), 7 * 32 * 32);
        Ok(())
    }

    #[test]
    fn identity_resize_and_thumbnail() -> crate::error::Result<()> {
        let data: Vec<u8> = (0..448 * 448 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let img = RgbImage { width: 448, height: 448, data };
        assert_eq!(resize_bilinear(&img, 448, 448), img);
        let p = PreparedImage::new(&img, 36)?;
        let norm = p.normalized();
        let pv = p.pixel_values();
        for (a, b) in pv[..3 * 448 * 448].iter().zip(&norm) {
            assert!((a - b).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn too_thin_is_rejected() -> crate::error::Result<()> {
        let img = RgbImage { width: 5000, height: 5, data: vec![0; 5000 * 5 * 3] };
        let err = PreparedImage::new(&img, 36).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("10 px"), "{err}");
        Ok(())
    }
}
