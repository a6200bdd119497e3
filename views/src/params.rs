//! The parameters of one view and the store-wide settings they are drawn with.

use serde::{Deserialize, Serialize};

/// One colour-jitter operation of torchvision's `ColorJitter` on PIL images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOp {
    /// `ImageEnhance.Brightness`: blend with black.
    Brightness,
    /// `ImageEnhance.Contrast`: blend with the rounded mean of `convert("L")`.
    Contrast,
    /// `ImageEnhance.Color`: blend with `convert("L").convert("RGB")`.
    Saturation,
}

impl ColorOp {
    /// One-letter code used in the index (`b`, `c`, `s`).
    pub fn code(self) -> char {
        match self {
            ColorOp::Brightness => 'b',
            ColorOp::Contrast => 'c',
            ColorOp::Saturation => 's',
        }
    }

    /// Inverse of [`ColorOp::code`].
    pub fn from_code(c: char) -> Option<Self> {
        match c {
            'b' => Some(ColorOp::Brightness),
            'c' => Some(ColorOp::Contrast),
            's' => Some(ColorOp::Saturation),
            _ => None,
        }
    }
}

/// A crop box in pixel coordinates of the (already flipped) original image,
/// as torchvision's `RandomResizedCrop.get_params` returns it (`i, j, h, w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row (`i`).
    pub top: u32,
    /// First column (`j`), on the flipped image when the view is flipped.
    pub left: u32,
    /// Rows (`h`).
    pub height: u32,
    /// Columns (`w`).
    pub width: u32,
}

/// Interpolation used for the resized crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// Pillow's `Image.BICUBIC` (a = -0.5, support scaled on downsampling,
    /// 22-bit fixed-point coefficients, two passes: horizontal then vertical).
    PilBicubic,
}

/// Everything that determines one view's pixels, apart from the image and
/// the output size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewParams {
    /// Width of the decoded original image (after EXIF orientation).
    pub image_width: u32,
    /// Height of the decoded original image (after EXIF orientation).
    pub image_height: u32,
    /// Colour operations in the order they are applied, with their factors.
    pub jitter: [(ColorOp, f32); 3],
    /// Horizontal flip, applied after the colour jitter and before the crop.
    pub flip: bool,
    /// The crop box on the flipped image.
    pub crop: CropBox,
}

impl ViewParams {
    /// The jitter order as a 3-letter code, e.g. `"cbs"`.
    pub fn jitter_order(&self) -> String {
        self.jitter.iter().map(|(op, _)| op.code()).collect()
    }

    /// The factor of one operation.
    pub fn factor(&self, op: ColorOp) -> f32 {
        self.jitter.iter().find(|(o, _)| *o == op).map(|(_, f)| *f).unwrap_or(1.0)
    }

    /// Rebuild from the index columns. Returns `None` when `order` is not a
    /// permutation of `b`, `c`, `s`.
    #[allow(clippy::too_many_arguments)] // one argument per index column
    pub fn from_parts(
        image_width: u32,
        image_height: u32,
        order: &str,
        brightness: f32,
        contrast: f32,
        saturation: f32,
        flip: bool,
        crop: CropBox,
    ) -> Option<Self> {
        let ops: Vec<ColorOp> = order.chars().map(ColorOp::from_code).collect::<Option<_>>()?;
        if ops.len() != 3 || !ops.contains(&ColorOp::Brightness) || !ops.contains(&ColorOp::Contrast) || !ops.contains(&ColorOp::Saturation)
        {
            return None;
        }
        let f = |op| match op {
            ColorOp::Brightness => brightness,
            ColorOp::Contrast => contrast,
            ColorOp::Saturation => saturation,
        };
        Some(Self { image_width, image_height, jitter: [(ops[0], f(ops[0])), (ops[1], f(ops[1])), (ops[2], f(ops[2]))], flip, crop })
    }
}

/// Store-wide augmentation settings (REFERENCE.md defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewSettings {
    /// Brightness jitter strength: factors uniform in `[1-b, 1+b]`.
    pub brightness: f64,
    /// Contrast jitter strength.
    pub contrast: f64,
    /// Saturation jitter strength.
    pub saturation: f64,
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
    /// `RandomResizedCrop` area fraction range.
    pub scale: (f64, f64),
    /// `RandomResizedCrop` aspect-ratio range.
    pub ratio: (f64, f64),
    /// Student input size in pixels (square).
    pub student_size: u32,
    /// Teacher input size in pixels (square).
    pub teacher_size: u32,
    /// Interpolation of the resized crop.
    pub interpolation: Interpolation,
    /// Whether EXIF orientation is applied when decoding (torchvision's
    /// default loader ignores it; caev2 applies it by default).
    pub apply_exif_orientation: bool,
}

impl ViewSettings {
    /// The released CAE v2 augmentation with the given output sizes.
    pub fn cae_v2(student_size: u32, teacher_size: u32) -> Self {
        Self {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            flip_prob: 0.5,
            scale: (0.4, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            student_size,
            teacher_size,
            interpolation: Interpolation::PilBicubic,
            apply_exif_orientation: true,
        }
    }
}
