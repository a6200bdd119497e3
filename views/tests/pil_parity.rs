//! Bit-for-bit parity of caev2's view rendering with Pillow (the library
//! torchvision's PIL transforms call), on real photos shipped by the setup
//! script and on synthetic images of odd sizes.

use std::path::{Path, PathBuf};
use std::process::Command;

use caev2_views::{RgbImage, ViewSampler, ViewSettings, decode_image, render_view};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn python() -> PathBuf {
    let p = std::env::var_os("CAEV2_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace().join(".deps/py/bin/python"));
    assert!(p.exists(), "{} not found: run scripts/setup.sh first", p.display());
    p
}

fn check_image(path: &Path, sizes: &[u32], views: u32) {
    let img = decode_image(path, false).expect("decodes").rgb;
    let sampler = ViewSampler::new(11, ViewSettings::cae_v2(224, 224));
    for &size in sizes {
        let params: Vec<_> = (0..views).map(|v| sampler.sample(7, v, img.width(), img.height())).collect();
        let spec = serde_json::json!({
            "image": path,
            "size": size,
            "views": params.iter().map(|p| serde_json::json!({
                "order": p.jitter_order(),
                "brightness": p.factor(caev2_views::ColorOp::Brightness),
                "contrast": p.factor(caev2_views::ColorOp::Contrast),
                "saturation": p.factor(caev2_views::ColorOp::Saturation),
                "flip": p.flip, "top": p.crop.top, "left": p.crop.left,
                "height": p.crop.height, "width": p.crop.width,
            })).collect::<Vec<_>>(),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let spec_path = dir.path().join("spec.json");
        let out_path = dir.path().join("out.bin");
        std::fs::write(&spec_path, spec.to_string()).expect("write spec");
        let status = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pil_reference.py"))
            .arg(&spec_path)
            .arg(&out_path)
            .status()
            .expect("run python");
        assert!(status.success(), "pil_reference.py failed");
        let reference = std::fs::read(&out_path).expect("read reference");
        let n = (size * size * 3) as usize;
        for (v, p) in params.iter().enumerate() {
            let ours = render_view(&img, p, size);
            let theirs = &reference[v * n..(v + 1) * n];
            let diff = ours.as_raw().iter().zip(theirs).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{}: view {v} at {size}px differs from Pillow in {diff} of {n} bytes ({p:?})", path.display());
        }
    }
}

#[test]
fn real_photos_match_pillow_bit_for_bit() {
    let photos = workspace().join(".deps/data/photos");
    assert!(photos.exists(), "{} missing: run scripts/setup.sh", photos.display());
    for name in ["astronaut.png", "camera.png", "logo.png", "coffee.png"] {
        check_image(&photos.join(name), &[224, 196], 6);
    }
}

#[test]
fn odd_sizes_match_pillow_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (w, h) in [(1, 1), (3, 700), (700, 3), (150, 113), (224, 224), (1031, 97)] {
        let img =
            RgbImage::from_fn(w, h, |x, y| image::Rgb([((x * 31 + y * 7) % 256) as u8, ((x * x + y) % 251) as u8, ((y * 13) % 256) as u8]));
        let path = dir.path().join(format!("synthetic_{w}x{h}.png"));
        img.save(&path).expect("save png");
        check_image(&path, &[224, 16], 3);
    }
}
