//! The CAE v2 student: ViT encoder over visible patches, encoder-to-regressor
//! projection, cross-attention latent contextual regressor, shared head.
//!
//! Paper: "CAE v2: Context Autoencoder with CLIP Latent Alignment" (TMLR
//! 2023); behaviour as in the authors' released code (REFERENCE.md). The
//! encoder's parameter names are timm's `vit_*_patch16_224` names
//! (`patch_embed.proj`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, `norm`,
//! `cls_token`), so its weights load into timm without renaming.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Student size presets (REFERENCE.md, "Student model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// ViT-Tiny: 12 x 192, 12 heads; regressor 1 x 96; 30 of 196 masked.
    Tiny,
    /// ViT-Small: 12 x 384, 6 heads; regressor 1 x 384; 49 masked.
    Small,
    /// ViT-Base: 12 x 768, 12 heads; regressor 4 x 768; 98 masked.
    Base,
    /// ViT-Large: 24 x 1024, 16 heads; regressor 4 x 1024; 118 masked.
    Large,
}

impl Preset {
    /// Parse `tiny|small|base|large`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tiny" => Some(Self::Tiny),
            "small" => Some(Self::Small),
            "base" => Some(Self::Base),
            "large" => Some(Self::Large),
            _ => None,
        }
    }

    /// The timm model name the encoder maps onto.
    pub fn timm_name(self) -> &'static str {
        match self {
            Self::Tiny => "vit_tiny_patch16_224",
            Self::Small => "vit_small_patch16_224",
            Self::Base => "vit_base_patch16_224",
            Self::Large => "vit_large_patch16_224",
        }
    }
}

/// Everything that shapes the student.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The preset the defaults came from.
    pub preset: Preset,
    /// Input size in pixels.
    pub image_size: i64,
    /// Patch size.
    pub patch_size: i64,
    /// Encoder blocks.
    pub depth: i64,
    /// Encoder width.
    pub width: i64,
    /// Encoder heads.
    pub heads: i64,
    /// MLP hidden size / width.
    pub mlp_ratio: i64,
    /// Layer-scale init (encoder and regressor).
    pub layer_scale_init: f64,
    /// Maximum drop-path rate (linearly increasing over encoder blocks).
    pub drop_path: f64,
    /// Regressor blocks (0 allowed: masked predictions come from the mask token alone).
    pub regressor_depth: i64,
    /// Regressor width.
    pub regressor_width: i64,
    /// Regressor heads.
    pub regressor_heads: i64,
    /// Target dimension (the teacher's).
    pub target_dim: i64,
}

impl ModelConfig {
    /// The preset's configuration for targets of `target_dim`.
    pub fn preset(p: Preset, target_dim: i64) -> Self {
        let (depth, width, heads, rdepth, rwidth, ls, dp) = match p {
            Preset::Tiny => (12, 192, 12, 1, 96, 0.1, 0.1),
            Preset::Small => (12, 384, 6, 1, 384, 0.1, 0.1),
            Preset::Base => (12, 768, 12, 4, 768, 0.1, 0.1),
            Preset::Large => (24, 1024, 16, 4, 1024, 1e-5, 0.2),
        };
        Self {
            preset: p,
            image_size: 224,
            patch_size: 16,
            depth,
            width,
            heads,
            mlp_ratio: 4,
            layer_scale_init: ls,
            drop_path: dp,
            regressor_depth: rdepth,
            regressor_width: rwidth,
            // REFERENCE.md says 12 heads for every size, which cannot split
            // 1024 channels; Large uses 16 (head dim 64), like its encoder.
            regressor_heads: if p == Preset::Large { 16 } else { 12 },
            target_dim,
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// The same configuration for `px`-pixel inputs, or `None` when `px` is
    /// not a positive multiple of the patch size.
    pub fn with_image_size(mut self, px: i64) -> Option<Self> {
        (px > 0 && px % self.patch_size == 0).then(|| {
            self.image_size = px;
            self
        })
    }

    /// Patches per image.
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Model FLOPs of one training step per image with `masked` of the
    /// patches masked: three times the forward pass's multiply-adds (x2),
    /// the usual count for forward + backward. Counted: the patch embedding
    /// (over every patch, as the encoder computes it), the encoder blocks
    /// over the visible patches and CLS (projections, attention scores and
    /// mix, MLP), the encoder-to-regressor projection, the regressor blocks
    /// (masked queries against visible + masked keys) and the shared head
    /// on every output token. Norms, softmax and element-wise work are left
    /// out, as in MFU accounting.
    pub fn train_flops_per_image(&self, masked: i64) -> f64 {
        let (np, d, dr, r, t) =
            (self.num_patches() as f64, self.width as f64, self.regressor_width as f64, self.mlp_ratio as f64, self.target_dim as f64);
        let m = masked as f64;
        let n = np - m + 1.0;
        let patch = 2.0 * np * (3 * self.patch_size * self.patch_size) as f64 * d;
        let block = 2.0 * n * d * d * (4.0 + 2.0 * r) + 4.0 * n * n * d;
        let enc_to_reg = if dr != d { 2.0 * n * d * dr } else { 0.0 };
        let kv = np;
        let cross = 2.0 * dr * dr * (2.0 * m + 2.0 * kv + 2.0 * r * m) + 4.0 * m * kv * dr;
        let head = 2.0 * (n + m) * dr * t;
        let forward = patch + self.depth as f64 * block + enc_to_reg + self.regressor_depth as f64 * cross + head;
        3.0 * forward
    }

    /// Default number of masked patches (T/S/B/L: 30/49/98/118 of 196).
    /// (the counts of the released scripts; other grids scale the ratio).
    pub fn default_masked(&self) -> i64 {
        let (count, ratio) = match self.preset {
            Preset::Tiny => (30, 0.15),
            Preset::Small => (49, 0.25),
            Preset::Base => (98, 0.5),
            Preset::Large => (118, 0.6),
        };
        if self.num_patches() == 196 { count } else { (ratio * self.num_patches() as f64).round() as i64 }
    }
}

/// Fixed 2-D sin-cos position embedding as in CAE / MoCo v3
/// (`build_2d_sincos_position_embedding`, temperature 10000): for patch
/// `(row a, col b)`, `[sin(a w), cos(a w), sin(b w), cos(b w)]` with
/// `w_d = 10000^(-d / (dim/4))`; the CLS position is all zeros.
/// Returns `[1 + grid^2, dim]`.
pub fn sincos_pos_embed(grid: i64, dim: i64) -> Tensor {
    let pos_dim = dim / 4;
    let omega = Tensor::arange(pos_dim, (Kind::Float, tch::Device::Cpu)) / pos_dim as f64;
    let omega = (omega * -(10000f64.ln())).exp();
    let idx = Tensor::arange(grid * grid, (Kind::Float, tch::Device::Cpu));
    let a = idx.divide_scalar_mode(grid, "floor");
    let b = idx.remainder(grid);
    let out_a = a.unsqueeze(1) * omega.unsqueeze(0);
    let out_b = b.unsqueeze(1) * omega.unsqueeze(0);
    let pe = Tensor::cat(&[out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], 1);
    Tensor::cat(&[Tensor::zeros([1, dim], (Kind::Float, tch::Device::Cpu)), pe], 0)
}

/// `trunc_normal_(t, std=std)` as the released CAE code calls it: a normal
/// of mean 0 and the given std, truncated at **one** std (`a=-std, b=std`),
/// sampled by inverse CDF like timm's `trunc_normal_`.
fn trunc_normal(p: &nn::Path, name: &str, dims: &[i64], std: f64) -> Tensor {
    p.var_copy(name, &trunc_normal_values(dims, std).to_device(p.device()))
}

fn trunc_normal_values(dims: &[i64], std: f64) -> Tensor {
    // 2 Phi(1) - 1 = erf(1 / sqrt 2) = P(|Z| < 1): the uniform range whose
    // erfinv is a standard normal truncated at one std.
    const HI: f64 = 0.682_689_492_137_085_9;
    let u = Tensor::empty(dims, (Kind::Float, tch::Device::Cpu)).uniform_(-HI, HI);
    (u.erfinv() * (std * std::f64::consts::SQRT_2)).clamp(-std, std)
}

/// Per-block drop-path rates `torch.linspace(0, max, depth)` (so `[0]` for
/// one block), as the released encoder and regressor build them.
pub fn drop_path_rates(max: f64, depth: i64) -> Vec<f64> {
    match depth {
        d if d <= 0 => Vec::new(),
        1 => vec![0.0],
        d => (0..d).map(|i| max * i as f64 / (d - 1) as f64).collect(),
    }
}

/// A linear layer initialised as the released model re-initialises every
/// `nn.Linear` after construction: xavier-uniform weight, zero bias.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub ws: Tensor,
    /// `[out]`, absent for bias-free layers.
    pub bs: Option<Tensor>,
}

impl Linear {
    fn new(p: nn::Path, din: i64, dout: i64, bias: bool) -> Self {
        let bound = (6.0 / (din + dout) as f64).sqrt();
        let ws = p.var("weight", &[dout, din], nn::Init::Uniform { lo: -bound, up: bound });
        let bs = bias.then(|| p.zeros("bias", &[dout]));
        Self { ws, bs }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.ws, self.bs.as_ref())
    }
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps: 1e-6, ..Default::default() })
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Inference: no drop path.
    Eval,
    /// Training on rows `offset..offset + B` of a global batch of `global`
    /// samples (B = the tensor's batch). Drop path draws its per-sample keep
    /// masks for the whole global batch and takes this slice, so a
    /// data-parallel rank draws exactly what a single process training the
    /// global batch draws for the same samples.
    Train {
        /// Samples in the global batch.
        global: i64,
        /// First row of this process's slice.
        offset: i64,
    },
}

impl Pass {
    /// Training on a whole batch of `batch` samples in one process.
    pub fn train(batch: i64) -> Self {
        Self::Train { global: batch, offset: 0 }
    }
}

fn drop_path(x: Tensor, p: f64, pass: Pass) -> Tensor {
    let Pass::Train { global, offset } = pass else { return x };
    if p == 0.0 {
        return x;
    }
    let keep = 1.0 - p;
    let b = x.size()[0];
    let shape: Vec<i64> = std::iter::once(b).chain(std::iter::repeat_n(1, x.dim() - 1)).collect();
    let mask =
        Tensor::empty([global.max(offset + b)], (x.kind(), x.device())).bernoulli_float_(keep).narrow(0, offset, b).view(shape.as_slice());
    x * mask / keep
}

#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        Self { fc1: Linear::new(&p / "fc1", dim, hidden, true), fc2: Linear::new(&p / "fc2", hidden, dim, true) }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("none"))
    }
}

/// Split `[B, N, D]` into heads `[B, H, N, D/H]`.
fn heads(x: &Tensor, h: i64) -> Tensor {
    let (b, n, d) = x.size3().expect("rank-3 tensor");
    x.reshape([b, n, h, d / h]).transpose(1, 2)
}

fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, n, hd) = x.size4().expect("rank-4 tensor");
    x.transpose(1, 2).reshape([b, n, h * hd])
}

/// A pre-norm ViT block with layer scale (timm `Block` names).
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    ls2: Tensor,
    heads: i64,
    drop_path: f64,
}

impl Block {
    fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: i64, ls: f64, drop_path: f64) -> Self {
        let attn = &p / "attn";
        Self {
            norm1: layer_norm(&p / "norm1", dim),
            qkv: Linear::new(&attn / "qkv", dim, 3 * dim, true),
            proj: Linear::new(&attn / "proj", dim, dim, true),
            ls1: (&p / "ls1").var("gamma", &[dim], nn::Init::Const(ls)),
            norm2: layer_norm(&p / "norm2", dim),
            mlp: Mlp::new(&p / "mlp", dim, dim * mlp_ratio),
            ls2: (&p / "ls2").var("gamma", &[dim], nn::Init::Const(ls)),
            heads,
            drop_path,
        }
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let (b, n, d) = x.size3().expect("rank 3");
        let qkv = self.qkv.forward(&self.norm1.forward(x)).reshape([b, n, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(&qkv.get(0), &qkv.get(1), &qkv.get(2), None, 0.0, false, None, false);
        let a = self.proj.forward(&merge_heads(&a));
        let x = x + drop_path(a * &self.ls1, self.drop_path, pass);
        let m = self.mlp.forward(&self.norm2.forward(&x));
        &x + drop_path(m * &self.ls2, self.drop_path, pass)
    }
}

/// The regressor's cross-attention block (REFERENCE.md):
/// `x = q + g1 * CrossAttn(LN_q(q + pos_q), k = LN_k(kv + pos_kv), v = LN_v(kv))`,
/// `x = LN2(x); x = x + g2 * MLP(x)`; q and v biases, no k bias.
#[derive(Debug)]
struct CrossBlock {
    norm_q: nn::LayerNorm,
    norm_k: nn::LayerNorm,
    norm_v: nn::LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    ls2: Tensor,
    heads: i64,
    drop_path: f64,
}

impl CrossBlock {
    fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: i64, ls: f64, drop_path: f64) -> Self {
        let attn = &p / "cross_attn";
        Self {
            norm_q: layer_norm(&p / "norm1_q", dim),
            norm_k: layer_norm(&p / "norm1_k", dim),
            norm_v: layer_norm(&p / "norm1_v", dim),
            q: Linear::new(&attn / "q", dim, dim, true),
            k: Linear::new(&attn / "k", dim, dim, false),
            v: Linear::new(&attn / "v", dim, dim, true),
            proj: Linear::new(&attn / "proj", dim, dim, true),
            ls1: (&p / "ls1").var("gamma", &[dim], nn::Init::Const(ls)),
            norm2: layer_norm(&p / "norm2", dim),
            mlp: Mlp::new(&p / "mlp", dim, dim * mlp_ratio),
            ls2: (&p / "ls2").var("gamma", &[dim], nn::Init::Const(ls)),
            heads,
            drop_path,
        }
    }

    fn forward(&self, q: &Tensor, kv: &Tensor, pos_q: &Tensor, pos_kv: &Tensor, pass: Pass) -> Tensor {
        let qh = heads(&self.q.forward(&self.norm_q.forward(&(q + pos_q))), self.heads);
        let kh = heads(&self.k.forward(&self.norm_k.forward(&(kv + pos_kv))), self.heads);
        let vh = heads(&self.v.forward(&self.norm_v.forward(kv)), self.heads);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(&qh, &kh, &vh, None, 0.0, false, None, false);
        let a = self.proj.forward(&merge_heads(&a));
        let x = q + drop_path(a * &self.ls1, self.drop_path, pass);
        let x = self.norm2.forward(&x);
        let m = self.mlp.forward(&x);
        &x + drop_path(m * &self.ls2, self.drop_path, pass)
    }
}

/// What one forward pass returns.
#[derive(Debug)]
pub struct Output {
    /// L2-normalised predictions for `[cls, visible...]`: `[B, 1 + Nv, target_dim]`.
    pub visible: Tensor,
    /// L2-normalised predictions for the masked patches: `[B, Nm, target_dim]`.
    pub masked: Tensor,
}

/// The CAE v2 student.
#[derive(Debug)]
pub struct Cae2 {
    cfg: ModelConfig,
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    enc_to_reg: Option<(Linear, nn::LayerNorm)>,
    mask_token: Tensor,
    reg_pos: Tensor,
    regressor: Vec<CrossBlock>,
    head_norm: nn::LayerNorm,
    head: Linear,
}

impl Cae2 {
    /// Build the model under `root` (parameters are created with the current
    /// torch RNG; seed it first for reproducible initialisation).
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.width;
        let dr = cfg.regressor_width;
        // conv weight: trunc-normal(0.02) at one std, bias 0 (the encoder's `_init_weights`)
        let mut patch_embed = nn::conv2d(
            root / "patch_embed" / "proj",
            3,
            d,
            cfg.patch_size,
            nn::ConvConfig { stride: cfg.patch_size, ws_init: nn::Init::Const(0.0), ..Default::default() },
        );
        let w = trunc_normal_values(&patch_embed.ws.size(), 0.02).to_device(root.device());
        tch::no_grad(|| patch_embed.ws.copy_(&w));
        let dpr = drop_path_rates(cfg.drop_path, cfg.depth);
        let rdpr = drop_path_rates(cfg.drop_path, cfg.regressor_depth);
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(root / "blocks" / i, d, cfg.heads, cfg.mlp_ratio, cfg.layer_scale_init, dpr[i as usize]))
            .collect();
        let enc_to_reg =
            (dr != d).then(|| (Linear::new(root / "enc_to_reg" / "proj", d, dr, true), layer_norm(root / "enc_to_reg" / "norm", dr)));
        let regressor = (0..cfg.regressor_depth)
            .map(|i| {
                CrossBlock::new(
                    root / "regressor" / "blocks" / i,
                    dr,
                    cfg.regressor_heads,
                    cfg.mlp_ratio,
                    cfg.layer_scale_init,
                    rdpr[i as usize],
                )
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            patch_embed,
            cls_token: trunc_normal(root, "cls_token", &[1, 1, d], 0.02),
            pos_embed: sincos_pos_embed(cfg.grid(), d).unsqueeze(0).to_device(root.device()),
            blocks,
            norm: layer_norm(root / "norm", d),
            enc_to_reg,
            mask_token: trunc_normal(&(root / "regressor"), "mask_token", &[1, 1, dr], 0.02),
            reg_pos: sincos_pos_embed(cfg.grid(), dr).unsqueeze(0).to_device(root.device()),
            regressor,
            head_norm: layer_norm(root / "head" / "norm", dr),
            head: Linear::new(root / "head" / "proj", dr, cfg.target_dim, true),
        }
    }

    /// A freshly initialised student on `device`, drawn from the torch RNG
    /// seeded with `seed`: a training run's step-0 model, or a random-init floor.
    pub fn seeded(cfg: &ModelConfig, seed: u64, device: tch::Device) -> (nn::VarStore, Self) {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root(), cfg);
        (vs, model)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The fixed encoder position embedding `[1, 1 + patches, width]` (timm's `pos_embed`).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Encoder over CLS + the visible patches: `images [B,3,S,S]`,
    /// `visible [B, Nv]` (patch indices, row-major) -> `[B, 1 + Nv, width]`.
    pub fn encode(&self, images: &Tensor, visible: &Tensor, pass: Pass) -> Tensor {
        let d = self.cfg.width;
        let x = self.patch_embed.forward(images).flatten(2, 3).transpose(1, 2);
        let x = x + self.pos_embed.narrow(1, 1, self.cfg.num_patches());
        let x = x.gather(1, &visible.unsqueeze(-1).expand([-1, -1, d], false), false);
        let b = x.size()[0];
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[cls, x], 1);
        for blk in &self.blocks {
            x = blk.forward(&x, pass);
        }
        self.norm.forward(&x)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        let y = self.head.forward(&self.head_norm.forward(x));
        let n = y.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-6);
        y / n
    }

    /// Full pretraining forward: encoder on visible patches, regressor for
    /// the masked ones, shared head on both.
    pub fn forward(&self, images: &Tensor, visible: &Tensor, masked: &Tensor, pass: Pass) -> Output {
        self.regress_and_head(&self.encode(images, visible, pass), visible, masked, pass)
    }

    /// Everything after the encoder: `latent [B, 1 + Nv, width]` (CLS first)
    /// -> projection to the regressor width -> regressor over the masked
    /// positions -> shared head. As in the released code, the CLS latent is
    /// dropped before the regressor (its keys and values are the visible
    /// patch latents and the current queries) and only feeds the head.
    pub fn regress_and_head(&self, latent: &Tensor, visible: &Tensor, masked: &Tensor, pass: Pass) -> Output {
        let latent = match &self.enc_to_reg {
            Some((lin, ln)) => ln.forward(&lin.forward(latent)),
            None => latent.shallow_clone(),
        };
        let dr = self.cfg.regressor_width;
        let b = latent.size()[0];
        let nm = masked.size()[1];
        let patch_pos = self.reg_pos.narrow(1, 1, self.cfg.num_patches()).expand([b, -1, -1], false);
        let pos_visible = patch_pos.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dr], false), false);
        let pos_masked = patch_pos.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dr], false), false);
        let pos_kv = Tensor::cat(&[&pos_visible, &pos_masked], 1);
        let visible_patches = latent.narrow(1, 1, latent.size()[1] - 1);
        let mut q = self.mask_token.expand([b, nm, dr], false).contiguous();
        for blk in &self.regressor {
            let kv = Tensor::cat(&[&visible_patches, &q], 1);
            q = blk.forward(&q, &kv, &pos_masked, &pos_kv, pass);
        }
        Output { visible: self.head(&latent), masked: self.head(&q) }
    }

    /// The drop-path rate of every encoder block and every regressor block.
    pub fn drop_path_rates(&self) -> (Vec<f64>, Vec<f64>) {
        (self.blocks.iter().map(|b| b.drop_path).collect(), self.regressor.iter().map(|b| b.drop_path).collect())
    }
}

/// Whether a parameter gets weight decay, as in the released code (BEiT's
/// `get_parameter_groups` with the top-level model's empty skip list):
/// everything of rank >= 2 decays, the CLS and mask tokens included; 1-D
/// parameters (biases, norms, layer-scale gammas) do not. The position
/// embeddings are fixed buffers, never parameters (REFERENCE.md, "Optimisation").
pub fn decays(_name: &str, t: &Tensor) -> bool {
    t.dim() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbl(t: Tensor) -> f64 {
        t.double_value(&[])
    }

    /// ViT-Base at 224 px with 98 of 196 patches masked and 512-dim targets
    /// (CLIP-B/16): ~73 GFLOP per image and step, the figure issue 11
    /// estimated by hand (~74).
    #[test]
    fn train_flops_of_vit_base() {
        let cfg = ModelConfig::preset(Preset::Base, 512);
        let f = cfg.train_flops_per_image(98);
        assert!((70e9..76e9).contains(&f), "{f:e}");
        // more masking, less encoder work
        assert!(cfg.train_flops_per_image(120) < f);
    }

    #[test]
    fn shapes_for_every_preset() {
        for p in [Preset::Tiny, Preset::Small, Preset::Base, Preset::Large] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let mut cfg = ModelConfig::preset(p, 512);
            // keep the test fast: real widths and heads, 1 encoder block
            cfg.depth = 1;
            let m = Cae2::new(&vs.root(), &cfg);
            let nm = cfg.default_masked();
            let idx = Tensor::arange(196, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0).repeat([2, 1]);
            let (masked, visible) = (idx.narrow(1, 0, nm), idx.narrow(1, nm, 196 - nm));
            let out = m.forward(&Tensor::randn([2, 3, 224, 224], (Kind::Float, tch::Device::Cpu)), &visible, &masked, Pass::train(2));
            assert_eq!(out.visible.size(), [2, 1 + 196 - nm, 512], "{p:?}");
            assert_eq!(out.masked.size(), [2, nm, 512], "{p:?}");
            let norms = out.masked.norm_scalaropt_dim(2.0, [-1], false);
            assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-4, "outputs are L2-normalised");
        }
        assert_eq!(
            [Preset::Tiny, Preset::Small, Preset::Base, Preset::Large].map(|p| ModelConfig::preset(p, 512).default_masked()),
            [30, 49, 98, 118]
        );
    }

    #[test]
    fn timm_parameter_names() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = Cae2::new(&vs.root(), &ModelConfig::preset(Preset::Tiny, 512));
        let vars = vs.variables();
        for name in [
            "cls_token",
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
            "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.weight",
            "blocks.0.attn.qkv.bias",
            "blocks.0.attn.proj.weight",
            "blocks.0.ls1.gamma",
            "blocks.11.mlp.fc2.bias",
            "blocks.11.ls2.gamma",
            "norm.weight",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert_eq!(vars["blocks.0.attn.qkv.weight"].size(), [576, 192]);
        assert!(!vars.contains_key("regressor.blocks.0.cross_attn.k.bias"), "no k bias");
    }

    #[test]
    fn weight_decay_groups_follow_the_released_code() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = Cae2::new(&vs.root(), &ModelConfig::preset(Preset::Tiny, 512));
        let vars = vs.variables();
        let decay = |n: &str| decays(n, &vars[n]);
        // the released model has no top-level no-weight-decay list: the tokens decay
        for n in [
            "blocks.0.attn.qkv.weight",
            "blocks.3.mlp.fc1.weight",
            "patch_embed.proj.weight",
            "head.proj.weight",
            "enc_to_reg.proj.weight",
            "regressor.blocks.0.cross_attn.k.weight",
            "cls_token",
            "regressor.mask_token",
        ] {
            assert!(decay(n), "{n} should decay");
        }
        for n in [
            "blocks.0.attn.qkv.bias",
            "patch_embed.proj.bias",
            "blocks.0.ls1.gamma",
            "norm.weight",
            "norm.bias",
            "head.norm.weight",
            "regressor.blocks.0.cross_attn.q.bias",
            "regressor.blocks.0.ls2.gamma",
        ] {
            assert!(!decay(n), "{n} should not decay");
        }
        assert!(vars.keys().all(|n| !n.contains("pos_embed")), "position embeddings are fixed, not parameters");
    }

    #[test]
    fn cls_latent_is_not_a_regressor_key_or_value() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut cfg = ModelConfig::preset(Preset::Tiny, 64);
        cfg.depth = 1;
        cfg.regressor_depth = 2;
        let m = Cae2::new(&vs.root(), &cfg);
        let idx = Tensor::arange(196, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0).repeat([2, 1]);
        let (masked, visible) = (idx.narrow(1, 0, 30), idx.narrow(1, 30, 166));
        let latent = Tensor::randn([2, 167, 192], (Kind::Float, tch::Device::Cpu));
        let moved = latent.copy();
        let _ = moved.narrow(1, 0, 1).fill_(7.0);
        let (a, b) = tch::no_grad(|| {
            (m.regress_and_head(&latent, &visible, &masked, Pass::Eval), m.regress_and_head(&moved, &visible, &masked, Pass::Eval))
        });
        assert_eq!(dbl((&a.masked - &b.masked).abs().max()), 0.0, "masked predictions ignore the CLS latent");
        assert!(dbl((a.visible.narrow(1, 0, 1) - b.visible.narrow(1, 0, 1)).abs().max()) > 1e-3, "CLS still feeds the head");
        // a visible patch latent does reach the masked predictions
        let patch = latent.copy();
        let _ = patch.narrow(1, 5, 1).fill_(7.0);
        let c = tch::no_grad(|| m.regress_and_head(&patch, &visible, &masked, Pass::Eval));
        assert!(dbl((&a.masked - &c.masked).abs().max()) > 1e-4);
    }

    /// A data-parallel rank's slice draws the same keep masks as the same
    /// rows of the whole batch in one process.
    #[test]
    fn drop_path_of_a_slice_equals_the_slice_of_the_global_batch() {
        let x = Tensor::ones([8, 3, 2], (Kind::Float, tch::Device::Cpu));
        tch::manual_seed(5);
        let whole = drop_path(x.shallow_clone(), 0.5, Pass::train(8));
        tch::manual_seed(5);
        let slice = drop_path(x.narrow(0, 4, 4), 0.5, Pass::Train { global: 8, offset: 4 });
        assert!(whole.narrow(0, 4, 4).equal(&slice));
        let kept = whole.sum(Kind::Float).double_value(&[]);
        assert!(kept > 0.0 && kept < 8.0 * 6.0 * 2.0, "some samples dropped, some kept: {kept}");
        assert!(drop_path(x.shallow_clone(), 0.5, Pass::Eval).equal(&x));
    }

    #[test]
    fn drop_path_rates_per_block() {
        assert_eq!(drop_path_rates(0.1, 1), vec![0.0], "torch.linspace(0, 0.1, 1) == [0]");
        let r4 = drop_path_rates(0.1, 4);
        for (got, want) in r4.iter().zip([0.0, 0.1 / 3.0, 0.2 / 3.0, 0.1]) {
            assert!((got - want).abs() < 1e-12, "{r4:?}");
        }
        assert!(drop_path_rates(0.1, 0).is_empty());
        for (preset, reg) in [(Preset::Tiny, vec![0.0]), (Preset::Base, r4.clone())] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let cfg = ModelConfig::preset(preset, 64);
            let m = Cae2::new(&vs.root(), &cfg);
            let (enc, got) = m.drop_path_rates();
            assert_eq!(got, reg, "{preset:?} regressor");
            assert_eq!(enc.len(), 12);
            assert_eq!((enc[0], enc[11]), (0.0, 0.1), "{preset:?} encoder");
        }
    }

    #[test]
    fn initialisation_matches_the_released_code() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = Cae2::new(&vs.root(), &ModelConfig::preset(Preset::Tiny, 512));
        let vars = vs.variables();
        let max = |t: &Tensor| dbl(t.abs().max());
        let std = |t: &Tensor| dbl(t.std(true));
        let mut linears = 0;
        for (name, t) in &vars {
            if name.ends_with(".weight") && t.dim() == 2 {
                // xavier_uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)); std b / sqrt 3
                let (fo, fi) = (t.size()[0] as f64, t.size()[1] as f64);
                let bound = (6.0 / (fi + fo)).sqrt();
                assert!(max(t) <= bound, "{name}: {} > xavier bound {bound}", max(t));
                assert!((std(t) / (bound / 3f64.sqrt()) - 1.0).abs() < 0.05, "{name}: std {} vs {}", std(t), bound / 3f64.sqrt());
                let bias = name.replace(".weight", ".bias");
                if let Some(b) = vars.get(&bias) {
                    assert_eq!(max(b), 0.0, "{bias} starts at 0");
                }
                linears += 1;
            }
        }
        // encoder 12 x 4 + enc_to_reg + regressor 1 x 6 (q, k, v, proj, fc1, fc2) + head
        assert_eq!(linears, 12 * 4 + 1 + 6 + 1);
        // tokens and the patch-embedding conv: normal(0.02) truncated at +-1 std
        // (std of such a truncated normal: 0.02 * 0.5396)
        for name in ["cls_token", "regressor.mask_token", "patch_embed.proj.weight"] {
            let t = &vars[name];
            assert!(max(t) <= 0.02 + 1e-9, "{name} truncated at one std");
            assert!(max(t) > 0.015, "{name} is not degenerate");
        }
        let conv = &vars["patch_embed.proj.weight"];
        assert!((std(conv) / (0.02 * 0.5396) - 1.0).abs() < 0.02, "conv std {}", std(conv));
        assert_eq!(max(&vars["patch_embed.proj.bias"]), 0.0);
        assert_eq!(dbl(vars["norm.weight"].min()), 1.0);
    }

    #[test]
    fn sincos_matches_the_formula() {
        let pe = sincos_pos_embed(14, 8);
        assert_eq!(pe.size(), [197, 8]);
        assert_eq!(pe.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // patch (row 2, col 3) = token 1 + 2*14 + 3; omega = [1, 1e-2]
        let t = pe.get(1 + 2 * 14 + 3);
        let expect = [2f64.sin(), 0.02f64.sin(), 2f64.cos(), 0.02f64.cos(), 3f64.sin(), 0.03f64.sin(), 3f64.cos(), 0.03f64.cos()];
        for (i, e) in expect.iter().enumerate() {
            assert!((t.double_value(&[i as i64]) - e).abs() < 1e-5, "dim {i}");
        }
    }
}
