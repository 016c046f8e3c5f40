//! Reading images: any of jpg, png, ppm/pgm, bmp, tiff, webp, gif (first frame), from a path or
//! from bytes, converted to 8-bit RGB the way PIL's `convert("RGB")` does (alpha dropped, not
//! composited; palettes expanded; 16-bit grey clipped to 255 as PIL's `I;16 → RGB`; 16-bit
//! colour reduced to its high byte). Size limits are checked from the header before any pixel
//! is decoded, and a decoder panic on a crafted file becomes an error.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader};

use crate::error::{Error, Result};

/// Limits that keep a hostile or broken file from exhausting memory.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest accepted file, in bytes.
    pub max_file_bytes: u64,
    /// Largest accepted width × height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_file_bytes: 64 << 20,
            max_pixels: 64_000_000,
        }
    }
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Reads and decodes an image file.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<RgbImage> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Media(format!("cannot read image {what}: {e}")))?;
    if meta.len() > limits.max_file_bytes {
        return Err(Error::Media(format!(
            "image {what} is {} bytes, over the {}-byte limit",
            meta.len(),
            limits.max_file_bytes
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| Error::Media(format!("cannot read image {what}: {e}")))?;
    decode_named(&bytes, limits, &what)
}

/// Decodes an image held in memory.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    decode_named(bytes, limits, "input")
}

fn decode_named(bytes: &[u8], limits: &ImageLimits, what: &str) -> Result<RgbImage> {
    let fail = |m: String| Error::Media(format!("image {what}: {m}"));
    if bytes.is_empty() {
        return Err(fail("the file is empty (0 bytes)".into()));
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(fail(format!("{} bytes, over the {}-byte limit", bytes.len(), limits.max_file_bytes)));
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(e.to_string()))
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(fail("unrecognised or unsupported image format".into()));
    }
    let (w, h) = r
        .into_dimensions()
        .map_err(|e| fail(format!("cannot read the header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(fail(format!("has zero size ({w}×{h})")));
    }
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(fail(format!(
            "{w}×{h} is {} pixels, over the {}-pixel limit",
            w as u64 * h as u64,
            limits.max_pixels
        )));
    }
    let mut r = reader()?;
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(w);
    lim.max_image_height = Some(h);
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    r.limits(lim);
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.decode()))
        .map_err(|_| fail("the decoder crashed on this file (corrupt or crafted)".into()))?
        .map_err(|e| fail(format!("cannot decode: {e}")))?;
    Ok(to_rgb(decoded))
}

/// PIL's `convert("RGB")` for each pixel layout the decoders produce.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        // PIL opens 16-bit grey as "I;16" and clips it to 255 when converting to RGB.
        DynamicImage::ImageLuma16(b) => {
            b.into_raw().into_iter().flat_map(|v| [v.min(255) as u8; 3]).collect()
        }
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| [p[0].min(255) as u8; 3]).collect()
        }
        // PIL reads 16-bit colour PNGs as 8-bit RGB (the high byte).
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn encode(img: DynamicImage, fmt: image::ImageFormat) -> std::result::Result<Vec<u8>, image::ImageError> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt)?;
        Ok(out.into_inner())
    }

    #[test]
    fn every_format_decodes_to_rgb() -> TestResult {
        let rgb = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 200]));
        let base = DynamicImage::ImageRgb8(rgb.clone());
        use image::ImageFormat as F;
        for fmt in [F::Png, F::Bmp, F::Tiff, F::Pnm, F::Gif, F::WebP] {
            let img = decode_image(&encode(base.clone(), fmt)?, &ImageLimits::default())
                .map_err(|e| format!("{fmt:?}: {e}"))?;
            assert_eq!((img.width, img.height), (7, 5), "{fmt:?}");
            if fmt != F::Gif {
                assert_eq!(img.data, rgb.as_raw().clone(), "{fmt:?}");
            }
        }
        let jpg = decode_image(&encode(base, F::Jpeg)?, &ImageLimits::default())?;
        assert_eq!(jpg.data.len(), 7 * 5 * 3);
        Ok(())
    }

    #[test]
    fn alpha_is_dropped_and_grey_replicated() -> TestResult {
        let rgba = image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([10, 20, 30, x as u8 * 255]));
        let img = decode_image(&encode(DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png)?, &ImageLimits::default())?;
        assert_eq!(img.data, vec![10, 20, 30, 10, 20, 30]);
        let grey = image::GrayImage::from_fn(2, 1, |x, _| image::Luma([x as u8 * 100 + 5]));
        let img = decode_image(&encode(DynamicImage::ImageLuma8(grey), image::ImageFormat::Png)?, &ImageLimits::default())?;
        assert_eq!(img.data, vec![5, 5, 5, 105, 105, 105]);
        let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(2, 1, |x, _| image::Luma([x as u16 * 1000 + 7]));
        let img = decode_image(&encode(DynamicImage::ImageLuma16(g16), image::ImageFormat::Png)?, &ImageLimits::default())?;
        assert_eq!(img.data, vec![7, 7, 7, 255, 255, 255]);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_clear_errors() -> TestResult {
        let lim = ImageLimits::default();
        let msg = |r: Result<RgbImage>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(decode_image(&[], &lim)).contains("empty"));
        assert!(msg(decode_image(b"definitely not an image", &lim)).contains("unsupported"));
        let png = encode(DynamicImage::ImageRgb8(image::RgbImage::new(64, 64)), image::ImageFormat::Png)?;
        assert!(msg(decode_image(&png[..png.len() / 2], &lim)).contains("decode"));
        // A header that claims 30000×30000 (a decompression bomb in waiting).
        let mut huge = b"P6\n30000 30000\n255\n".to_vec();
        huge.extend_from_slice(&[0u8; 64]);
        let e = msg(decode_image(&huge, &lim));
        assert!(e.contains("30000×30000") && e.contains("limit"), "{e}");
        let e = msg(load_image(Path::new("/nonexistent/x.png"), &lim));
        assert!(e.contains("/nonexistent/x.png"), "{e}");
        Ok(())
    }
}
