//! The exported encoder round-trips: every tensor equals the checkpoint's
//! (under timm's names), `pos_embed` is the fixed sin-cos table, nothing of
//! the pretraining head or regressor is left, and shapes are timm's.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor, nn};
use trainer::model::{Cae2, ModelConfig, Preset, sincos_pos_embed};

#[test]
fn exported_tensors_round_trip() {
    let tmp = tempfile::tempdir().expect("tmp");
    // a run folder with a checkpoint, as the trainer writes it
    let run = tmp.path().join("run");
    let ck = run.join("checkpoints/step-00000007");
    std::fs::create_dir_all(&ck).expect("mkdir");
    let model_cfg = ModelConfig::preset(Preset::Small, 512);
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Cae2::new(&vs.root(), &model_cfg);
    vs.save(ck.join("model.safetensors")).expect("save");
    let cfg = serde_json::json!({
        "store": "s", "data": "d", "model": model_cfg,
        "loss": {"kind": "cosine", "weighting": "code", "visible": true, "masked": true},
        "masking": "block", "num_masked": 49, "batch": 2, "steps": 7, "lr": 0.001, "min_lr": 0.0, "warmup_steps": 1,
        "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05}, "clip_grad": 3.0, "seed": 3, "live_teacher": null
    });
    std::fs::write(run.join("config.json"), cfg.to_string()).expect("config");

    let out = tmp.path().join("enc.safetensors");
    let e = tools::export::export(&ck, &out).expect("export");
    let got: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out).expect("read").into_iter().collect();
    assert_eq!(e.tensors, got.len());
    let vars = vs.variables();
    for (name, t) in &vars {
        if tools::export::PRETRAINING_ONLY.iter().any(|p| name.starts_with(p)) {
            assert!(!got.contains_key(name), "{name} must not be exported");
            continue;
        }
        let g = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(g.equal(t), "{name} differs");
    }
    let pos = &got["pos_embed"];
    assert_eq!(pos.size(), [1, 197, 384]);
    assert!(pos.squeeze_dim(0).allclose(&sincos_pos_embed(14, 384), 0.0, 0.0, false));
    assert_eq!(got["blocks.11.attn.qkv.weight"].size(), [1152, 384]);
    assert_eq!(got["patch_embed.proj.weight"].size(), [384, 3, 16, 16]);
    assert_eq!(got["cls_token"].size(), [1, 1, 384]);
    assert_eq!(got["blocks.0.ls1.gamma"].kind(), Kind::Float);
    // 4 + 12 blocks x 14 tensors + norm
    assert_eq!(got.len(), 4 + 12 * 14 + 2);
    let check: BTreeMap<String, Tensor> = Tensor::read_safetensors(&e.check).expect("read").into_iter().collect();
    assert_eq!(check["features"].size(), [2, 197, 384]);
}
