//! The teacher model: loading, identity, inference.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use sha2::{Digest, Sha256};
use shard_store::TeacherInfo;

use crate::error::{Result, TeacherError};

/// Where `scripts/setup.sh` installs things, baked in at build time.
pub fn deps_dir() -> PathBuf {
    PathBuf::from(env!("CAEV2_BUILD_DEPS_DIR"))
}

/// The ONNX Runtime library: `$ORT_DYLIB_PATH`, else the GPU build
/// (onnxruntime-gpu) when `scripts/setup.sh` installed it (on machines with
/// an NVIDIA driver, or with `CAEV2_GPU=1`), else the CPU build. The GPU
/// build runs the CPU provider as well.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let gpu = gpu_deps_dir().join("libonnxruntime.so");
    if gpu.exists() { gpu } else { deps_dir().join("onnxruntime/libonnxruntime.so") }
}

/// Where `scripts/setup.sh` puts onnxruntime-gpu and the CUDA 13 and cuDNN 9
/// libraries its CUDA provider loads (`nvidia/cu13/lib`, `nvidia/cudnn/lib`).
pub fn gpu_deps_dir() -> PathBuf {
    deps_dir().join("ort-gpu")
}

/// Whether this machine has an NVIDIA driver loaded.
fn nvidia_driver_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
}

/// Where the teacher runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TeacherDevice {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// The CUDA provider on GPU `device`.
    Cuda {
        /// CUDA device index.
        device: i32,
    },
    /// The TensorRT provider on GPU `device` (falling back to CUDA for nodes
    /// TensorRT does not take), with its engines cached in `cache`.
    TensorRt {
        /// CUDA device index.
        device: i32,
        /// Let TensorRT run layers in float16.
        fp16: bool,
        /// Engine and timing cache folder (building engines takes minutes).
        cache: PathBuf,
    },
}

impl TeacherDevice {
    /// Short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu => "CPU".into(),
            Self::Cuda { device } => format!("CUDA device {device}"),
            Self::TensorRt { device, fp16, .. } => format!("TensorRT on CUDA device {device}{}", if *fp16 { ", fp16" } else { "" }),
        }
    }
}

/// Whether the ONNX Runtime library ([`ort_library`]) has the CUDA provider,
/// i.e. is a GPU build (loads the library).
///
/// # Errors
/// [`TeacherError::Runtime`] when the library is missing or unusable.
fn cuda_provider_available() -> Result<bool> {
    use ort::ep::ExecutionProvider;
    environment()?;
    Ok(ort::ep::CUDA::is_available().unwrap_or(false))
}

/// Why the teacher cannot run on a GPU here, or `None` when it can: a
/// machine without an NVIDIA driver, or an ONNX Runtime library without the
/// CUDA provider (loads the library).
///
/// # Errors
/// [`TeacherError::Runtime`] when the library is missing or unusable.
pub fn gpu_unavailable() -> Result<Option<String>> {
    if !nvidia_driver_present() {
        return Ok(Some("no NVIDIA driver on this machine".into()));
    }
    if !cuda_provider_available()? {
        return Ok(Some(format!(
            "{} is ONNX Runtime without CUDA support: run scripts/setup.sh on this machine (it installs onnxruntime-gpu where an \
             NVIDIA driver is present, or with CAEV2_GPU=1), or point ORT_DYLIB_PATH at onnxruntime-gpu's library",
            ort_library().display()
        )));
    }
    Ok(None)
}

/// Make the GPU providers loadable: the library must be a GPU build, and the
/// CUDA and cuDNN libraries setup installed are loaded first (otherwise they
/// come from `LD_LIBRARY_PATH`).
fn prepare_gpu() -> Result<()> {
    if let Some(why) = gpu_unavailable()? {
        return Err(TeacherError::Runtime(format!("{why}; use --device cpu")));
    }
    let nvidia = gpu_deps_dir().join("nvidia");
    let (cuda, cudnn) = (nvidia.join("cu13/lib"), nvidia.join("cudnn/lib"));
    if cuda.exists() && cudnn.exists() {
        ort::ep::cuda::preload_dylibs(Some(&cuda), Some(&cudnn))
            .map_err(|e| TeacherError::Runtime(format!("loading the CUDA libraries in {}: {e}", nvidia.display())))?;
    }
    Ok(())
}

/// The folder of teacher models: `$CAEV2_MODELS`, else `.deps/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("CAEV2_MODELS").map(PathBuf::from).unwrap_or_else(|| deps_dir().join("models"))
}

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library once.
///
/// # Errors
/// [`TeacherError::Runtime`] when the library is missing or unusable.
pub fn environment() -> Result<&'static Environment> {
    ENV.get_or_init(|| {
        let lib = ort_library();
        if !lib.exists() {
            return Err(format!("ONNX Runtime library {} not found: run scripts/setup.sh or set ORT_DYLIB_PATH", lib.display()));
        }
        ort::init_from(&lib)
            .map_err(|e| format!("cannot load {}: {e}", lib.display()))?
            .with_name("caev2")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", lib.display()))
    })
    .as_ref()
    .map_err(|e| TeacherError::Runtime(e.clone()))
}

/// The version of ONNX Runtime's library (`1.31.1`), loading it if it is
/// not loaded yet; `None` where it cannot be loaded.
pub fn ort_version() -> Option<String> {
    environment().ok()?;
    let lib = std::ffi::CString::new(ort_library().into_os_string().into_encoded_bytes()).ok()?;
    // SAFETY: RTLD_NOLOAD finds the library environment() loaded (no new
    // load); OrtGetApiBase takes nothing and returns a static table whose
    // GetVersionString returns a static NUL-terminated string.
    unsafe {
        let handle = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let get = libc::dlsym(handle, c"OrtGetApiBase".as_ptr());
        libc::dlclose(handle);
        if get.is_null() {
            return None;
        }
        let get: unsafe extern "C" fn() -> *const ort::sys::OrtApiBase = std::mem::transmute(get);
        let base = get();
        if base.is_null() {
            return None;
        }
        let v = ((*base).GetVersionString)();
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

/// What the user said about the teacher; `None` fields come from the
/// model's `caev2.*` metadata.
#[derive(Debug, Clone, Default)]
pub struct TeacherSpec {
    /// The ONNX file.
    pub path: PathBuf,
    /// Name to record.
    pub name: Option<String>,
    /// Input size in pixels.
    pub input_size: Option<u32>,
    /// Input mean.
    pub mean: Option<[f32; 3]>,
    /// Input std.
    pub std: Option<[f32; 3]>,
    /// Patch size.
    pub patch_size: Option<u32>,
    /// Whether token 0 is CLS.
    pub has_cls: Option<bool>,
    /// Output name (default: the model's first output).
    pub output: Option<String>,
    /// Where it runs.
    pub device: TeacherDevice,
}

/// Built-in CLIP teachers, exported by `target-extractor/scripts/export_clip.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipModel {
    /// CLIP ViT-B/16 at 224 px: 197 x 512 targets.
    Base16,
    /// CLIP ViT-L/14 at 196 px: 197 x 768 targets.
    Large14,
}

impl ClipModel {
    /// Parse `base16` / `large14`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "base16" | "b16" => Some(Self::Base16),
            "large14" | "l14" => Some(Self::Large14),
            _ => None,
        }
    }

    /// File name in the models folder.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Base16 => "clip-vit-b16.onnx",
            Self::Large14 => "clip-vit-l14.onnx",
        }
    }

    /// Argument of the export script.
    pub fn export_arg(self) -> &'static str {
        match self {
            Self::Base16 => "base16",
            Self::Large14 => "large14",
        }
    }

    /// The spec for this model in `models_dir`, or an error that says how
    /// to create it.
    ///
    /// # Errors
    /// [`TeacherError::Model`] when the file does not exist.
    pub fn spec(self, models_dir: &Path) -> Result<TeacherSpec> {
        let path = models_dir.join(self.file_name());
        if !path.exists() {
            return Err(TeacherError::Model {
                path,
                what: format!(
                    "not found. Export it once (needs torch + transformers and network access for the weights):\n  \
                     python target-extractor/scripts/export_clip.py --model {} --out {}\n\
                     or use --teacher FILE.onnx (e.g. {}/dinov2-vits14.onnx, installed by scripts/setup.sh)",
                    self.export_arg(),
                    models_dir.join(self.file_name()).display(),
                    models_dir.display()
                ),
            });
        }
        Ok(TeacherSpec { path, ..Default::default() })
    }
}

/// A loaded teacher.
pub struct Teacher {
    session: Session,
    input_name: String,
    output_name: String,
    info: TeacherInfo,
    path: PathBuf,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher").field("path", &self.path).field("info", &self.info).finish()
    }
}

/// Parse `"R,G,B"` (three comma-separated numbers) as in `caev2.mean`.
pub fn parse_triple(s: &str) -> Option<[f32; 3]> {
    let v: Vec<f32> = s.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
    (v.len() == 3).then(|| [v[0], v[1], v[2]])
}

/// SHA-256 of a file, hex.
///
/// # Errors
/// IO errors.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| TeacherError::io(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| TeacherError::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl Teacher {
    /// Load the model, resolve its identity and probe its output shape with
    /// one forward pass.
    ///
    /// # Errors
    /// [`TeacherError::Model`] naming the file and what does not fit.
    pub fn load(spec: &TeacherSpec, intra_threads: usize) -> Result<Self> {
        let path = spec.path.clone();
        let bad = |what: String| TeacherError::Model { path: path.clone(), what };
        if !path.exists() {
            return Err(bad("file not found".into()));
        }
        let env = environment()?;
        let mut builder =
            Session::builder(env)?.with_optimization_level(GraphOptimizationLevel::All)?.with_intra_threads(intra_threads.max(1))?;
        let providers = match &spec.device {
            TeacherDevice::Cpu => Vec::new(),
            TeacherDevice::Cuda { device } => vec![ort::ep::CUDA::default().with_device_id(*device).build().error_on_failure()],
            TeacherDevice::TensorRt { device, fp16, cache } => {
                std::fs::create_dir_all(cache).map_err(|e| TeacherError::io(cache, "create the TensorRT cache folder", e))?;
                let cache = cache.display().to_string();
                vec![
                    ort::ep::TensorRT::default()
                        .with_device_id(*device)
                        .with_fp16(*fp16)
                        .with_engine_cache(true)
                        .with_engine_cache_path(&cache)
                        .with_timing_cache(true)
                        .with_timing_cache_path(&cache)
                        .build()
                        .error_on_failure(),
                    ort::ep::CUDA::default().with_device_id(*device).build().error_on_failure(),
                ]
            }
        };
        if !providers.is_empty() {
            prepare_gpu()?;
            builder = builder
                .with_execution_providers(providers)
                .map_err(|e| TeacherError::Runtime(format!("{}: {e}", spec.device.describe())))?;
        }
        let session = builder.commit_from_file(&path).map_err(|e| bad(format!("cannot load: {e}")))?;
        let meta = session.metadata()?;
        let get = |k: &str| meta.custom(&format!("caev2.{k}"));
        let need = |what: &str, flag: &str| bad(format!("the model has no caev2.{what} metadata; pass {flag}"));
        let name = spec
            .name
            .clone()
            .or_else(|| get("name"))
            .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "teacher".into()));
        let mean = match spec.mean {
            Some(m) => m,
            None => get("mean").and_then(|s| parse_triple(&s)).ok_or_else(|| need("mean", "--teacher-mean R,G,B"))?,
        };
        let std = match spec.std {
            Some(s) => s,
            None => get("std").and_then(|s| parse_triple(&s)).ok_or_else(|| need("std", "--teacher-std R,G,B"))?,
        };
        let patch_size = match spec.patch_size {
            Some(p) => p,
            None => get("patch_size").and_then(|s| s.parse().ok()).ok_or_else(|| need("patch_size", "--teacher-patch N"))?,
        };
        let input_size = match spec.input_size {
            Some(s) => s,
            None => {
                get("default_input_size").and_then(|s| s.parse().ok()).ok_or_else(|| need("default_input_size", "--teacher-size PIXELS"))?
            }
        };
        let has_cls = match spec.has_cls {
            Some(c) => c,
            None => get("has_cls").map(|s| s == "true").unwrap_or(true),
        };
        drop(meta);
        if session.inputs().len() != 1 {
            return Err(bad(format!("expected one input [B,3,H,W], the model has {}", session.inputs().len())));
        }
        let input_name = session.inputs()[0].name().to_owned();
        let output_name = match spec.output.clone() {
            Some(o) => o,
            None => session.outputs().first().map(|o| o.name().to_owned()).ok_or_else(|| bad("the model has no outputs".into()))?,
        };
        if !session.outputs().iter().any(|o| o.name() == output_name) {
            let names: Vec<_> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
            return Err(bad(format!("no output named {output_name:?} (outputs: {names:?})")));
        }
        if patch_size == 0 || input_size % patch_size != 0 {
            return Err(bad(format!("input size {input_size} is not a multiple of the patch size {patch_size}")));
        }
        let onnx_sha256 = sha256_file(&path)?;
        let mut t = Self {
            session,
            input_name,
            output_name,
            info: TeacherInfo {
                name,
                onnx_sha256,
                output: String::new(),
                input_size,
                mean,
                std,
                patch_size,
                has_cls,
                grid: [input_size / patch_size; 2],
                tokens: 0,
                dim: 0,
                precision: if matches!(spec.device, TeacherDevice::TensorRt { fp16: true, .. }) { "fp16" } else { "fp32" }.into(),
            },
            path: path.clone(),
        };
        t.info.output = t.output_name.clone();
        // Probe: one forward pass gives tokens and dim.
        let s = input_size as usize;
        let probe = vec![0f32; 3 * s * s];
        let (shape, _) = t.forward_raw(&probe, 1).map_err(|e| bad(format!("fails on a 1x3x{s}x{s} input: {e}")))?;
        if shape.len() != 3 {
            return Err(bad(format!("output {:?} has shape {shape:?}, expected [B, tokens, dim]", t.output_name)));
        }
        let (tokens, dim) = (shape[1] as u32, shape[2] as u32);
        let g = input_size / patch_size;
        let expect = u32::from(has_cls) + g * g;
        if tokens != expect {
            return Err(bad(format!(
                "output has {tokens} tokens, expected {expect} ({}{g}x{g} patches at {input_size} px with patch {patch_size}); check --teacher-patch/--teacher-size/--teacher-has-cls",
                if has_cls { "CLS + " } else { "" }
            )));
        }
        t.info.tokens = tokens;
        t.info.dim = dim;
        Ok(t)
    }

    /// The identity recorded in stores.
    pub fn info(&self) -> &TeacherInfo {
        &self.info
    }

    /// The ONNX file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn forward_raw(&mut self, input: &[f32], batch: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        let s = self.info.input_size as usize;
        let tensor = TensorRef::from_array_view(([batch, 3, s, s], input))?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => tensor])?;
        let out = outputs
            .get(&self.output_name)
            .ok_or_else(|| TeacherError::Runtime(format!("output {:?} missing from the results", self.output_name)))?;
        let (shape, data) = out.try_extract_tensor::<f32>()?;
        Ok((shape.to_vec(), data.to_vec()))
    }

    /// Run a batch: `input` is `batch x 3 x S x S` (CHW, normalised), the
    /// result `batch x tokens x dim`.
    ///
    /// # Errors
    /// ONNX Runtime errors or an output of unexpected shape.
    pub fn forward(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        let (shape, data) = self.forward_raw(input, batch)?;
        let expect = [batch as i64, i64::from(self.info.tokens), i64::from(self.info.dim)];
        if shape != expect {
            return Err(TeacherError::Model { path: self.path.clone(), what: format!("output shape {shape:?}, expected {expect:?}") });
        }
        Ok(data)
    }
}
