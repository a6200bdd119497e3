//! Per-view rendering cost: decode once, then K views (jitter + flip + crop +
//! bicubic resize + normalise), as the extractor and the trainer do.
//!
//! `cargo bench -p caev2-views --bench render -- [IMAGE] [SIZE] [VIEWS]`

use std::time::Instant;

use caev2_views::{ViewSampler, ViewSettings, decode_image, normalize_chw, render_crop};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../.deps/data/imagenet-mini/n01614925/imagenet_17_22.jpg");
    let path = args.first().map(String::as_str).unwrap_or(default);
    let size: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(224);
    let views: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let t = Instant::now();
    let n_dec = 20;
    let mut img = None;
    for _ in 0..n_dec {
        img = Some(decode_image(path.as_ref(), true).expect("decode").rgb);
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(n_dec);
    let img = img.expect("decoded");
    let sampler = ViewSampler::new(0, ViewSettings::cae_v2(224, size));
    let mut buf = vec![0f32; 3 * (size * size) as usize];
    let (mut crop_s, mut resize_s, mut norm_s) = (0.0, 0.0, 0.0);
    for v in 0..views {
        let p = sampler.sample(0, v, img.width(), img.height());
        let t = Instant::now();
        let crop = render_crop(&img, &p);
        crop_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let view = crop.resize(size, size);
        resize_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        normalize_chw(&view, [0.5; 3], [0.25; 3], &mut buf);
        norm_s += t.elapsed().as_secs_f64();
    }
    let ms = |s: f64| s * 1e3 / f64::from(views);
    println!(
        "{path} ({}x{}): decode {decode_ms:.2} ms; one view at {size} px {:.2} ms = jitter+crop {:.2} + resize {:.2} + normalise {:.2}",
        img.width(),
        img.height(),
        ms(crop_s + resize_s + norm_s),
        ms(crop_s),
        ms(resize_s),
        ms(norm_s)
    );
}
