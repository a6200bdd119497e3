//! CAE v2 losses: visible latent alignment `l_v` (encoder outputs for CLS +
//! visible patches) and masked latent alignment `l_z` (regressor outputs),
//! against L2-normalised teacher tokens.

use tch::{Kind, Reduction, Tensor};

/// Per-token distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// `1 - cos(p, t)` (default).
    Cosine,
    /// Mean squared error over the token's values.
    Mse,
    /// Smooth-L1 (beta 1) over the token's values.
    SmoothL1,
}

/// How `l_v` and `l_z` are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// Released code: one mean over all `B x (1 + Nv + Nm)` tokens, so each
    /// term is weighted by its token count (default).
    Code,
    /// Paper Eq. 2: `mean(l_v) + mean(l_z)`.
    Paper,
}

/// Loss settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossConfig {
    /// Distance.
    pub kind: LossKind,
    /// Combination.
    pub weighting: Weighting,
    /// Whether `l_v` is on.
    pub visible: bool,
    /// Whether `l_z` is on.
    pub masked: bool,
}

impl Default for LossConfig {
    /// The paper's: both losses, cosine, the released code's weighting.
    fn default() -> Self {
        Self { kind: LossKind::Cosine, weighting: Weighting::Code, visible: true, masked: true }
    }
}

/// The loss terms of one batch.
#[derive(Debug)]
pub struct Losses {
    /// The value to minimise.
    pub total: Tensor,
    /// Mean `l_v` per token (reported even when off), a detached scalar
    /// tensor on the batch's device: reading it is a host sync, left to the
    /// caller.
    pub visible: Tensor,
    /// Mean `l_z` per token (reported even when off), like `visible`.
    pub masked: Tensor,
}

/// L2-normalise the last dimension.
pub fn l2_normalize(t: &Tensor) -> Tensor {
    t / t.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-6)
}

/// Per-token distances `[B, N]` between predictions and targets (both
/// `[B, N, D]`, targets normalised here; predictions are already unit).
pub fn token_distances(pred: &Tensor, target: &Tensor, kind: LossKind) -> Tensor {
    let t = l2_normalize(target);
    match kind {
        LossKind::Cosine => 1.0 - (pred * &t).sum_dim_intlist(&[-1i64][..], false, Kind::Float),
        LossKind::Mse => pred.mse_loss(&t, Reduction::None).mean_dim(&[-1i64][..], false, Kind::Float),
        LossKind::SmoothL1 => pred.smooth_l1_loss(&t, Reduction::None, 1.0).mean_dim(&[-1i64][..], false, Kind::Float),
    }
}

/// Combine the terms as configured.
///
/// # Panics
/// If both terms are off (rejected when the configuration is built).
pub fn losses(pred_v: &Tensor, target_v: &Tensor, pred_z: &Tensor, target_z: &Tensor, cfg: &LossConfig) -> Losses {
    assert!(cfg.visible || cfg.masked, "at least one loss term must be on");
    let dv = token_distances(pred_v, target_v, cfg.kind);
    let dz = token_distances(pred_z, target_z, cfg.kind);
    let (nv, nz) = (dv.numel() as f64, dz.numel() as f64);
    let (sv, sz) = (dv.sum(Kind::Float), dz.sum(Kind::Float));
    let visible = (&sv / nv.max(1.0)).detach();
    let masked = (&sz / nz.max(1.0)).detach();
    let total = match (cfg.visible, cfg.masked, cfg.weighting) {
        (true, true, Weighting::Code) => (sv + sz) / (nv + nz),
        (true, true, Weighting::Paper) => sv / nv.max(1.0) + sz / nz.max(1.0),
        (true, false, _) => sv / nv.max(1.0),
        (false, true, _) => sz / nz.max(1.0),
        (false, false, _) => unreachable!("checked above"),
    };
    Losses { total, visible, masked }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    #[test]
    fn each_distance_against_a_hand_computation() {
        // one token: prediction (1, 0), target (3, 4) -> unit (0.6, 0.8)
        let p = t(&[1.0, 0.0], &[1, 1, 2]);
        let y = t(&[3.0, 4.0], &[1, 1, 2]);
        let cos = token_distances(&p, &y, LossKind::Cosine).double_value(&[0, 0]);
        assert!((cos - 0.4).abs() < 1e-6, "1 - 0.6 = 0.4, got {cos}");
        let mse = token_distances(&p, &y, LossKind::Mse).double_value(&[0, 0]);
        assert!((mse - (0.16 + 0.64) / 2.0).abs() < 1e-6, "got {mse}");
        let sl1 = token_distances(&p, &y, LossKind::SmoothL1).double_value(&[0, 0]);
        assert!((sl1 - (0.5 * 0.16 + 0.5 * 0.64) / 2.0).abs() < 1e-6, "got {sl1}");
    }

    #[test]
    fn weighting_code_vs_paper_and_terms_off() {
        // 3 visible tokens at distance 0 (identical), 1 masked at distance 1 (orthogonal)
        let pv = t(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], &[1, 3, 2]);
        let pz = t(&[1.0, 0.0], &[1, 1, 2]);
        let yz = t(&[0.0, 2.0], &[1, 1, 2]);
        let run = |visible, masked, weighting| {
            let cfg = LossConfig { kind: LossKind::Cosine, weighting, visible, masked };
            losses(&pv, &pv, &pz, &yz, &cfg)
        };
        let code = run(true, true, Weighting::Code);
        assert!((code.total.double_value(&[]) - 0.25).abs() < 1e-6, "(0+0+0+1)/4");
        assert!((run(true, true, Weighting::Paper).total.double_value(&[]) - 1.0).abs() < 1e-6, "0 + 1");
        assert!(run(true, false, Weighting::Code).total.double_value(&[]).abs() < 1e-6);
        assert!((run(false, true, Weighting::Code).total.double_value(&[]) - 1.0).abs() < 1e-6);
        assert!(code.visible.double_value(&[]).abs() < 1e-6 && (code.masked.double_value(&[]) - 1.0).abs() < 1e-6);
    }
}
