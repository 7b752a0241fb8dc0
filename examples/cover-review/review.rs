//! The review itself: decodes the image and measures what makes a cover
//! usable — size, shape, exposure, sharpness.

use image::GenericImageView;
use serde::Serialize;

/// Covers are shown up to this size: smaller ones look blurry.
const MIN_SIDE: u32 = 600;
/// Width over height may differ from square by this much.
const MAX_ASPECT_DEVIATION: f64 = 0.05;
/// Mean luma (0–255) below which a cover is too dark, above which washed out.
const DARK: f64 = 35.0;
const WASHED_OUT: f64 = 230.0;
/// Variance of the Laplacian below which a cover is blurry.
const BLURRY: f64 = 60.0;
/// Side of the copy the measures are taken on.
const MEASURE_SIDE: u32 = 512;

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub approved: bool,
    /// Why not, for the creator.
    pub problems: Vec<String>,
    pub width: u32,
    pub height: u32,
    /// Mean luma, 0–255.
    pub brightness: f64,
    /// Variance of the Laplacian of the luma: higher is sharper.
    pub sharpness: f64,
}

impl Verdict {
    pub fn failed(problem: String) -> Self {
        Self {
            approved: false,
            problems: vec![problem],
            width: 0,
            height: 0,
            brightness: 0.0,
            sharpness: 0.0,
        }
    }
}

pub fn review(bytes: &[u8]) -> Verdict {
    let image = match image::load_from_memory(bytes) {
        Ok(image) => image,
        Err(err) => return Verdict::failed(format!("not an image we can read: {err}")),
    };
    let (width, height) = image.dimensions();
    let luma = image.thumbnail(MEASURE_SIDE, MEASURE_SIDE).to_luma8();
    let (w, h) = luma.dimensions();
    let pixels: Vec<f64> = luma.pixels().map(|p| f64::from(p.0[0])).collect();
    let brightness = pixels.iter().sum::<f64>() / pixels.len().max(1) as f64;
    // The 4-neighbour Laplacian over the inner pixels.
    let at = |x: u32, y: u32| pixels[(y * w + x) as usize];
    let mut laplacians = Vec::new();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            laplacians
                .push(at(x - 1, y) + at(x + 1, y) + at(x, y - 1) + at(x, y + 1) - 4.0 * at(x, y));
        }
    }
    let count = laplacians.len().max(1) as f64;
    let mean = laplacians.iter().sum::<f64>() / count;
    let sharpness = laplacians.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / count;

    let mut problems = Vec::new();
    if width.min(height) < MIN_SIDE {
        problems.push(format!(
            "{width}×{height} is too small: at least {MIN_SIDE}×{MIN_SIDE}"
        ));
    }
    let aspect = f64::from(width) / f64::from(height.max(1));
    if (aspect - 1.0).abs() > MAX_ASPECT_DEVIATION {
        problems.push(format!("a cover is square; this one is {aspect:.2}:1"));
    }
    if brightness < DARK {
        problems.push(format!("too dark (mean brightness {brightness:.0} of 255)"));
    } else if brightness > WASHED_OUT {
        problems.push(format!(
            "washed out (mean brightness {brightness:.0} of 255)"
        ));
    }
    if sharpness < BLURRY {
        problems.push(format!(
            "blurry (sharpness {sharpness:.0}, at least {BLURRY:.0})"
        ));
    }
    Verdict {
        approved: problems.is_empty(),
        problems,
        width,
        height,
        brightness,
        sharpness,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbImage};

    fn png(image: &RgbImage) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn a_sharp_square_cover_passes_and_a_flat_small_one_does_not() {
        let sharp = RgbImage::from_fn(800, 800, |x, y| {
            let on = ((x / 20) + (y / 20)) % 2 == 0;
            if on {
                Rgb([220, 180, 60])
            } else {
                Rgb([30, 40, 90])
            }
        });
        let verdict = review(&png(&sharp));
        assert!(verdict.approved, "{verdict:?}");
        let flat = RgbImage::from_pixel(300, 200, Rgb([10, 10, 10]));
        let verdict = review(&png(&flat));
        assert!(!verdict.approved);
        assert_eq!(verdict.problems.len(), 4, "{verdict:?}");
        assert!(!review(b"not an image").approved);
    }
}
