//! Stores that carry their images (`extract --embed-images`, format
//! version 2): the same targets as a store without them, trained from
//! with no image folder to the same losses, made again by `inspect recode
//! --embed-images` byte for byte, and damage to an image pack found.

use std::path::{Path, PathBuf};

use caev2_tests::*;
use shard_store::Store;

fn extract(data: &Path, out: &Path, extra: &[&str]) {
    extract_tiny(data, out, &[&["--views", "2", "--student-size", "112", "--images-per-shard", "8"], extra].concat());
}

fn train(store: &Path, data: Option<&Path>, out: &Path) -> std::process::Output {
    let mut args = vec!["train", "--shards", s(store), "--out", s(out), "--batch", "4", "--steps", "6", "--lr", "5e-4"];
    args.extend(["--warmup-steps", "2", "--threads", "1", "--device", "cpu", "--no-progress"]);
    if let Some(d) = data {
        args.extend(["--data", s(d)]);
    }
    run(&args)
}

fn err(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_store_that_carries_its_images_trains_without_them_to_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    imagenet_dataset(&data, 20);
    let (plain, embedded) = (tmp.path().join("plain"), tmp.path().join("embedded"));
    extract(&data, &plain, &[]);
    extract(&data, &embedded, &["--embed-images"]);
    let (p, e) = (Store::open(&plain).expect("plain"), Store::open(&embedded).expect("embedded"));
    assert_eq!((p.manifest().format_version, e.manifest().format_version), (1, 2));
    assert!(e.manifest().embeds_images());
    // the same targets, and each image's file bytes unchanged
    for row in p.index().expect("index") {
        let a = p.targets(row.image_id, row.view).expect("ok").expect("stored").bytes.to_vec();
        let b = e.targets(row.image_id, row.view).expect("ok").expect("stored").bytes.to_vec();
        assert_eq!(a, b, "image {} view {}", row.image_id, row.view);
        let file = std::fs::read(data.join(&row.path)).expect("read");
        assert_eq!(e.image(row.image_id).expect("ok").expect("embedded"), &file[..], "{}", row.path);
    }
    run_ok(&["inspect", "verify", s(&embedded)]);

    // recoding the plain store with its images gives the extracted bytes
    let recoded = tmp.path().join("recoded");
    run_ok(&["inspect", "recode", s(&plain), s(&recoded), "--embed-images", s(&data)]);
    assert_eq!(store_contents(&recoded), store_contents(&embedded), "recode --embed-images differs from extract --embed-images");
    assert_eq!(Store::open(&recoded).expect("open").manifest().store_id, e.manifest().store_id);

    // trained from the embedded store with no image folder at all: the same losses
    let reference = tmp.path().join("run-plain");
    assert!(train(&plain, Some(&data), &reference).status.success());
    let moved = tmp.path().join("moved-away");
    std::fs::rename(&data, &moved).expect("move the images away");
    let from_store = tmp.path().join("run-embedded");
    let o = train(&embedded, None, &from_store);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&from_store), losses(&reference), "embedded images train differently");
    let sheet = tmp.path().join("sheet.png");
    run_ok(&["inspect", "render", s(&embedded), "--image", "0", "--out", s(&sheet)]);
    assert!(sheet.exists());
    let align = run_ok(&["eval", "align", "--checkpoint", s(&from_store), "--views", "1..2", "--no-random", "--json"]);
    assert!(align.contains("align_masked"), "{align}");

    // without its images, a store needs --data, and says so in one line
    let e1 = err(&train(&plain, None, &tmp.path().join("run-none")));
    assert!(e1.contains("--data") && e1.trim().lines().count() == 1, "{e1}");
    // recoding from a folder whose image changed size is refused (a
    // replacement of the same size cannot be told from a version 1 store)
    std::fs::rename(&moved, &data).expect("move back");
    let photos = imagenet_photos(20);
    let first = p.index().expect("index")[0].path.clone();
    std::fs::copy(&photos[10].1, data.join(&first)).expect("replace an image");
    let e2 = err(&run(&["inspect", "recode", s(&plain), s(&tmp.path().join("bad")), "--embed-images", s(&data)]));
    assert!(e2.contains(&first) && e2.contains("not the image it was extracted from"), "{e2}");

    // a damaged image pack is found by verify and where training reads it
    let pack: PathBuf = embedded.join("images/shard-00000.bin");
    let mut bytes = std::fs::read(&pack).expect("read");
    bytes[64 + 100] ^= 0x20;
    std::fs::write(&pack, &bytes).expect("damage");
    let v = run(&["inspect", "verify", s(&embedded)]);
    let out = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(!v.status.success() && out.contains("image checksum mismatch"), "{out}");
    let e3 = err(&train(&embedded, None, &tmp.path().join("run-damaged")));
    assert!(e3.contains("shard-00000.bin") && e3.contains("checksum"), "{e3}");
}
