//! Data-parallel training on libtorch's own c10d (the engine of
//! torch.distributed): a `TCPStore` rendezvous and a `ProcessGroupGloo`,
//! bound through the small C++ shim `src/dist.cpp`.
//!
//! * [`Launch`] reads the launcher's environment: torchrun's `RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or Slurm's
//!   `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` when those are absent.
//! * [`Dist`] is this process's place in the group (a single process is a
//!   group of one with no communication): gradients averaged in a few flat
//!   buckets, metric sums, rank 0's tensors copied to every rank, and
//!   start-up checks that every rank runs the same settings.
//!
//! On CUDA, with every rank on its own GPU, the gradients go through NCCL
//! instead ([`crate::nccl`], `--dist-backend`); Gloo stays the control
//! plane (metrics, start-up agreement).
//!
//! Every collective has the group's timeout, and a rank that dies closes its
//! sockets, so the others fail with an error instead of hanging.

use std::ffi::{CString, c_char, c_int, c_void};
use std::ptr::NonNull;
use std::time::Duration;

use tch::Tensor;

use crate::error::{Result, TrainError};

/// Gradients are all-reduced in flat buckets of at most this many bytes
/// (DistributedDataParallel's default `bucket_cap_mb`).
pub const BUCKET_BYTES: i64 = 25 << 20;

/// `MASTER_PORT` when the launcher sets none (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where this process sits in a multi-process launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node (picks the GPU).
    pub local_rank: usize,
    /// Host of rank 0's store.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// The store is torchrun's agent store (no rank serves it).
    pub agent_store: bool,
    /// Network interfaces for Gloo (`GLOO_SOCKET_IFNAME`), comma-separated.
    pub interfaces: String,
    /// Which launcher the variables came from.
    pub launcher: &'static str,
}

impl Launch {
    /// The launch described by this process's environment; `None` for a
    /// plain single process.
    ///
    /// # Errors
    /// [`TrainError::Launch`] naming the variable that is missing or wrong.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any variable lookup.
    ///
    /// # Errors
    /// As [`Launch::from_env`].
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let parse = |name: &'static str, value: &str| {
            value.trim().parse::<usize>().map_err(|_| TrainError::Launch {
                var: name,
                value: value.into(),
                what: "expected a non-negative integer".into(),
            })
        };
        let (launcher, rank_var, world_var, local_var) = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else if var("SLURM_NTASKS").is_some() {
            ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            return Ok(None);
        };
        let required = |name: &'static str| {
            var(name).ok_or_else(|| TrainError::Launch {
                var: name,
                value: String::new(),
                what: format!("unset, but {} is set: a {launcher} launch needs both", if name == rank_var { world_var } else { rank_var }),
            })
        };
        let world_size = parse(world_var, &required(world_var)?)?;
        if launcher == "slurm" && world_size == 1 {
            // one Slurm task: a plain process (e.g. `caev2 train` inside sbatch without srun)
            return Ok(None);
        }
        if world_size == 0 {
            return Err(TrainError::Launch { var: world_var, value: "0".into(), what: "at least one process".into() });
        }
        let rank = parse(rank_var, &required(rank_var)?)?;
        if rank >= world_size {
            return Err(TrainError::Launch {
                var: rank_var,
                value: rank.to_string(),
                what: format!("must be below {world_var}={world_size}"),
            });
        }
        let local_rank = match var(local_var) {
            Some(v) => parse(local_var, &v)?,
            None => rank,
        };
        let master_addr = match var("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_owned(),
            _ if world_size == 1 => "127.0.0.1".into(),
            _ => {
                return Err(TrainError::Launch {
                    var: "MASTER_ADDR",
                    value: String::new(),
                    what: match launcher {
                        "slurm" => {
                            "unset: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) before srun".into()
                        }
                        _ => "unset: the host of rank 0 (torchrun sets it)".into(),
                    },
                });
            }
        };
        let master_port = match var("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(TrainError::Launch { var: "MASTER_PORT", value: p, what: "expected a port, 1 to 65535".into() }),
            },
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let interfaces = var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port, agent_store, interfaces, launcher }))
    }
}

unsafe extern "C" {
    fn caev2_dist_init(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        store_server: c_int,
        timeout_ms: c_int,
        ifaces: *const c_char,
        err: *mut c_char,
        n: usize,
    ) -> *mut c_void;
    fn caev2_dist_allreduce_sum(handle: *mut c_void, tensors: *mut *mut c_void, count: usize, err: *mut c_char, n: usize) -> c_int;
    fn caev2_dist_free(handle: *mut c_void);
}

/// A connected c10d Gloo process group.
#[derive(Debug)]
struct Group {
    handle: NonNull<c_void>,
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Group {
    fn connect(l: &Launch, timeout: Duration) -> std::result::Result<Self, String> {
        let host = CString::new(l.master_addr.as_str()).map_err(|_| "MASTER_ADDR holds a NUL byte".to_string())?;
        let ifaces = CString::new(l.interfaces.as_str()).map_err(|_| "GLOO_SOCKET_IFNAME holds a NUL byte".to_string())?;
        let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        let mut err = vec![0u8; 1024];
        let server = l.rank == 0 && !l.agent_store;
        // SAFETY: NUL-terminated strings and a buffer of the length passed;
        // the shim catches every C++ exception.
        let handle = unsafe {
            caev2_dist_init(
                host.as_ptr(),
                c_int::from(l.master_port),
                l.rank as c_int,
                l.world_size as c_int,
                c_int::from(server),
                ms,
                ifaces.as_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        NonNull::new(handle).map(|handle| Self { handle }).ok_or_else(|| message(&err))
    }

    /// Sum every tensor over all ranks, in place.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> std::result::Result<(), String> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter_mut().map(|t| t.as_mut_ptr().cast()).collect();
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensors (tch's C_tensor is an at::Tensor*), their
        // count, a buffer of the length passed; the shim catches exceptions.
        let rc =
            unsafe { caev2_dist_allreduce_sum(self.handle.as_ptr(), ptrs.as_mut_ptr(), ptrs.len(), err.as_mut_ptr().cast(), err.len()) };
        if rc == 0 { Ok(()) } else { Err(message(&err)) }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the handle came from caev2_dist_init and is freed once.
        unsafe { caev2_dist_free(self.handle.as_ptr()) }
    }
}

/// Which library all-reduces the gradients of a data-parallel run on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NCCL when every rank has a GPU of its own and NCCL loads, Gloo
    /// otherwise (saying why).
    Auto,
    /// NCCL, or an error.
    Nccl,
    /// Gloo, through host memory.
    Gloo,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "nccl" => Ok(Self::Nccl),
            "gloo" => Ok(Self::Gloo),
            other => Err(format!("{other}: expected auto, nccl or gloo")),
        }
    }
}

/// This process's place in data-parallel training.
#[derive(Debug)]
pub struct Dist {
    group: Option<Group>,
    /// NCCL for CUDA tensors, when set up by [`Dist::set_backend`].
    nccl: Option<crate::nccl::Comm>,
    /// Global rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// The launcher (`single`, `torchrun`, `slurm`).
    pub launcher: &'static str,
}

impl Dist {
    /// A plain single process.
    pub fn single() -> Self {
        Self { group: None, nccl: None, rank: 0, world: 1, local_rank: 0, launcher: "single" }
    }

    /// Join the group `launch` describes, or train alone without one.
    ///
    /// # Errors
    /// As [`Dist::connect`].
    pub fn join(launch: Option<&Launch>, timeout: Duration) -> Result<Self> {
        launch.map_or_else(|| Ok(Self::single()), |l| Self::connect(l, timeout))
    }

    /// Join the group `launch` describes (every rank must call this), with
    /// `timeout` for the rendezvous and for every collective.
    ///
    /// # Errors
    /// [`TrainError::Distributed`]: an unreachable `MASTER_ADDR`, a port in
    /// use, ranks that never arrive.
    pub fn connect(launch: &Launch, timeout: Duration) -> Result<Self> {
        let group = Group::connect(launch, timeout).map_err(|what| TrainError::Distributed {
            rank: launch.rank,
            world: launch.world_size,
            what: format!(
                "rendezvous at {}:{} failed ({what}); check MASTER_ADDR/MASTER_PORT, that the port is free, and that all {} ranks started",
                launch.master_addr, launch.master_port, launch.world_size
            ),
        })?;
        Ok(Self {
            group: Some(group),
            nccl: None,
            rank: launch.rank,
            world: launch.world_size,
            local_rank: launch.local_rank,
            launcher: launch.launcher,
        })
    }

    /// Choose how CUDA tensors are all-reduced (every rank must call this,
    /// with its own training device); returns the backend in words, e.g.
    /// `NCCL 2.28.9` or `Gloo (NCCL not loadable: ...)`. NCCL needs every rank
    /// on CUDA, on a GPU no other rank of its host uses, and NCCL loading
    /// everywhere; all ranks agree before any joins it.
    ///
    /// # Errors
    /// `--dist-backend nccl` where NCCL cannot be used; NCCL failing to set
    /// up; a failed collective.
    pub fn set_backend(&mut self, device: tch::Device, backend: Backend, timeout: Duration) -> Result<String> {
        if self.group.is_none() {
            return Ok(String::new());
        }
        let cuda = match device {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        if backend == Backend::Gloo || (cuda.is_none() && backend == Backend::Auto) {
            return Ok("Gloo".into());
        }
        // this rank's case: usable or not, its host, its GPU
        let usable = cuda.ok_or_else(|| "not on CUDA".to_string()).and_then(|_| crate::nccl::version().map(|_| ()));
        let row = [f64::from(u8::from(usable.is_ok())), host_id(), cuda.map_or(-1.0, |i| i as f64)];
        let all = self.all_gather(&row)?;
        let shared = (0..self.world).find(|&a| (0..a).any(|b| all[a][1] == all[b][1] && all[a][2] == all[b][2]));
        let why_not = match (&usable, all.iter().position(|r| r[0] == 0.0), shared) {
            (Err(e), _, _) => Some(format!("NCCL not usable here: {e}")),
            (_, Some(r), _) => Some(format!("NCCL not usable on rank {r}")),
            (_, _, Some(r)) => Some(format!("rank {r} shares its GPU with another rank; NCCL needs one GPU per rank")),
            _ => None,
        };
        if let Some(why) = why_not {
            if backend == Backend::Nccl {
                return Err(self.error(format!("--dist-backend nccl: {why}")));
            }
            return Ok(format!("Gloo through host memory ({why})"));
        }
        // rank 0's unique id, copied to every rank (bytes are exact in f64)
        let mut bytes = [0f64; 128];
        if self.is_main() {
            let id = crate::nccl::unique_id().map_err(|e| self.error(e));
            let id = self.agree("creating the NCCL id", id)?;
            bytes.iter_mut().zip(id.internal).for_each(|(b, x)| *b = f64::from(x));
        } else {
            self.agree("creating the NCCL id", Ok(()))?;
        }
        let t = Tensor::from_slice(&bytes);
        self.copy_from_main(std::slice::from_ref(&t))?;
        let got = Vec::<f64>::try_from(&t)?;
        let id = crate::nccl::UniqueId { internal: std::array::from_fn(|i| got[i] as u8) };
        let comm = crate::nccl::Comm::init(id, self.world, self.rank, cuda.unwrap_or(0), timeout).map_err(|e| self.error(e));
        self.nccl = Some(self.agree("joining NCCL", comm)?);
        Ok(format!("NCCL {}", crate::nccl::version().unwrap_or_default()))
    }

    /// Whether this process writes progress, metrics and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn error(&self, what: impl Into<String>) -> TrainError {
        TrainError::Distributed { rank: self.rank, world: self.world, what: what.into() }
    }

    fn sum_in_place(&self, tensors: &mut [Tensor], what: &str) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let failed = |e: String| self.error(format!("{what}: {e} (another rank stopped or timed out; see its output)"));
        if let Some(n) = self.nccl.as_ref().filter(|_| tensors.iter().all(|t| t.device().is_cuda())) {
            return n.all_reduce_sum(tensors).map_err(failed);
        }
        if !tensors.iter().any(|t| t.device().is_cuda()) {
            return g.all_reduce_sum(tensors).map_err(failed);
        }
        // Gloo reduces host memory: CUDA buffers are staged through the CPU
        let mut host: Vec<Tensor> = tensors.iter().map(|t| t.to_device(tch::Device::Cpu)).collect();
        g.all_reduce_sum(&mut host).map_err(failed)?;
        tch::no_grad(|| {
            for (t, h) in tensors.iter_mut().zip(&host) {
                t.copy_(h);
            }
        });
        Ok(())
    }

    /// Replace every gradient by its mean over the ranks, summed in flat
    /// buckets of at most [`BUCKET_BYTES`] (grouped by dtype and device, in
    /// the given order, which every rank shares).
    ///
    /// # Errors
    /// A failed collective.
    pub fn average_gradients(&self, grads: &[Tensor]) -> Result<()> {
        if self.group.is_none() || grads.is_empty() {
            return Ok(());
        }
        let mut buckets: Vec<Vec<&Tensor>> = Vec::new();
        let mut bytes = 0i64;
        for g in grads {
            let size = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
            let same = buckets.last().and_then(|b| b.first()).is_some_and(|f| f.kind() == g.kind() && f.device() == g.device());
            if !same || bytes + size > BUCKET_BYTES {
                buckets.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(b) = buckets.last_mut() {
                b.push(g);
            }
        }
        let mut flats: Vec<Tensor> =
            tch::no_grad(|| buckets.iter().map(|b| Tensor::cat(&b.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0)).collect());
        self.sum_in_place(&mut flats, "all-reducing gradients")?;
        let scale = 1.0 / self.world as f64;
        tch::no_grad(|| {
            for (bucket, flat) in buckets.iter().zip(&flats) {
                let mut offset = 0i64;
                for g in bucket {
                    let n = g.numel() as i64;
                    let mut dst = (*g).shallow_clone();
                    dst.copy_(&(flat.narrow(0, offset, n).view_as(g) * scale));
                    offset += n;
                }
            }
        });
        Ok(())
    }

    /// The sums over the ranks of `values` (the mean losses of a step...).
    ///
    /// # Errors
    /// A failed collective.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.group.is_none() {
            return Ok(values.to_vec());
        }
        let mut t = [Tensor::from_slice(values)];
        self.sum_in_place(&mut t, "summing metrics")?;
        Ok(Vec::<f64>::try_from(&t[0])?)
    }

    /// Copy rank 0's values of `tensors` into every rank's (an all-reduce
    /// sum to which the other ranks contribute zeros: `x + 0 = x` exactly).
    ///
    /// # Errors
    /// A failed collective.
    pub fn copy_from_main(&self, tensors: &[Tensor]) -> Result<()> {
        if self.group.is_none() || tensors.is_empty() {
            return Ok(());
        }
        let mut copies: Vec<Tensor> =
            tch::no_grad(|| tensors.iter().map(|t| if self.is_main() { t.detach().copy() } else { t.detach().zeros_like() }).collect());
        self.sum_in_place(&mut copies, "copying rank 0's state")?;
        tch::no_grad(|| {
            for (t, c) in tensors.iter().zip(&copies) {
                let mut dst = t.shallow_clone();
                dst.copy_(c);
            }
        });
        Ok(())
    }

    /// Every rank's result of a phase that can fail on some ranks only
    /// (opening the store, the run folder): all succeed together, or all
    /// fail (this rank with its own error, the others naming the ranks
    /// that failed).
    ///
    /// # Errors
    /// This rank's error, or [`TrainError::Distributed`].
    pub fn agree<T>(&self, phase: &str, result: Result<T>) -> Result<T> {
        self.agree_and_gather(phase, result, &[]).map(|(v, _)| v)
    }

    /// [`Dist::agree`] that also gathers every rank's `payload` (the same
    /// length on every rank; by rank), in the same single collective: what
    /// each rank opened, its settings' digest, its device.
    ///
    /// # Errors
    /// As [`Dist::agree`].
    pub fn agree_and_gather<T>(&self, phase: &str, result: Result<T>, payload: &[f64]) -> Result<(T, Vec<Vec<f64>>)> {
        if self.group.is_none() {
            return result.map(|v| (v, vec![payload.to_vec()]));
        }
        let mut row = Vec::with_capacity(1 + payload.len());
        row.push(f64::from(u8::from(result.is_err())));
        row.extend_from_slice(payload);
        let all = self.all_gather(&row)?;
        let bad: Vec<String> = all.iter().enumerate().filter(|(_, f)| f[0] > 0.0).map(|(r, _)| r.to_string()).collect();
        match result {
            Err(e) => Err(e),
            Ok(_) if !bad.is_empty() => Err(self.error(format!("{phase} failed on rank(s) {} (see their output)", bad.join(", ")))),
            Ok(v) => Ok((v, all.into_iter().map(|r| r[1..].to_vec()).collect())),
        }
    }

    /// Check that every rank's digest (of its settings, from
    /// [`digest_payload`], gathered by rank) equals rank 0's, so ranks
    /// started with different arguments are refused at start-up.
    ///
    /// # Errors
    /// [`TrainError::Distributed`] naming the ranks that differ from rank 0.
    pub fn check_same(&self, what: &str, digests: &[&[f64]]) -> Result<()> {
        let differ: Vec<String> = (1..digests.len()).filter(|&r| digests[r] != digests[0]).map(|r| r.to_string()).collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(self
                .error(format!("{what} of rank(s) {} differ from rank 0's: start every rank with the same arguments", differ.join(", "))))
        }
    }

    /// Every rank's `values` (the same length on every rank), by rank: an
    /// all-gather made of one all-reduce sum, each rank filling its own row.
    fn all_gather(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let n = values.len();
        let mut rows = vec![0f64; self.world * n];
        rows[self.rank * n..(self.rank + 1) * n].copy_from_slice(values);
        Ok(self.sum(&rows)?.chunks(n.max(1)).map(<[f64]>::to_vec).collect())
    }
}

/// A digest as numbers exact in f64 (16-bit pieces), for
/// [`Dist::agree_and_gather`].
pub fn digest_payload(digest: &[u8; 32]) -> Vec<f64> {
    digest.chunks(2).map(|c| f64::from(u16::from_le_bytes([c[0], c[1]]))).collect()
}

/// `text` as `len` bytes (cut or padded with zeros), one number each, for
/// [`Dist::agree_and_gather`]; [`text_of_payload`] reads it back.
pub fn text_payload(text: &str, len: usize) -> Vec<f64> {
    let mut out: Vec<f64> = text.bytes().take(len).map(f64::from).collect();
    out.resize(len, 0.0);
    out
}

/// The text of a [`text_payload`].
pub fn text_of_payload(payload: &[f64]) -> String {
    let bytes: Vec<u8> = payload.iter().map(|&b| b as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// This machine's host name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a buffer of the length passed; gethostname NUL-terminates
    // (or truncates, which only shortens the name).
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// This host, as a number exact in f64: 48 bits of a hash of its name.
fn host_id() -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    host_name().hash(&mut h);
    (h.finish() >> 16) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_launcher_is_a_single_process() {
        assert_eq!(launch(&[]).expect("test setup"), None);
        assert_eq!(launch(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]).expect("test setup"), None, "one Slurm task is a plain process");
    }

    #[test]
    fn torchrun_variables() {
        let l = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .expect("test setup")
        .expect("test setup");
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_addr.as_str(), l.master_port), (3, 8, 1, "node0", 29400));
        assert!(l.agent_store);
        assert_eq!(l.launcher, "torchrun");
    }

    #[test]
    fn slurm_fallbacks() {
        let l = launch(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "n1")])
            .expect("test setup")
            .expect("test setup");
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port, l.launcher), (5, 16, 1, DEFAULT_MASTER_PORT, "slurm"));
        // torchrun's variables win over Slurm's (torchrun inside an allocation)
        let l = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "4")])
            .expect("test setup")
            .expect("test setup");
        assert_eq!((l.rank, l.world_size, l.launcher), (0, 2, "torchrun"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = |vars: &[(&str, &str)]| launch(vars).expect_err("fails").to_string();
        assert_eq!(err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]), "RANK=2: must be below WORLD_SIZE=2");
        assert_eq!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]), "RANK=x: expected a non-negative integer");
        assert_eq!(err(&[("RANK", "-1"), ("WORLD_SIZE", "2")]), "RANK=-1: expected a non-negative integer");
        assert_eq!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]), "WORLD_SIZE=0: at least one process");
        assert!(err(&[("RANK", "0")]).starts_with("WORLD_SIZE=: unset, but RANK is set"));
        assert!(err(&[("WORLD_SIZE", "2")]).starts_with("RANK=: unset, but WORLD_SIZE is set"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).starts_with("MASTER_ADDR=: unset"));
        assert!(err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]).contains("scontrol show hostnames"));
        assert_eq!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]),
            "MASTER_PORT=70000: expected a port, 1 to 65535"
        );
        assert_eq!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("LOCAL_RANK", "a")]),
            "LOCAL_RANK=a: expected a non-negative integer"
        );
        // a group of one needs no address
        assert_eq!(launch(&[("RANK", "0"), ("WORLD_SIZE", "1")]).expect("test setup").expect("test setup").master_addr, "127.0.0.1");
    }

    /// Two ranks in threads of one process, on a free local port: sums,
    /// bucketed gradient means, rank 0's state copied, settings compared.
    #[test]
    fn two_gloo_ranks_reduce_copy_and_compare() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("test setup").local_addr().expect("test setup").port();
        let run = move |rank: usize| {
            let l = Launch {
                rank,
                world_size: 2,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                agent_store: false,
                interfaces: String::new(),
                launcher: "test",
            };
            let d = Dist::connect(&l, Duration::from_secs(60)).expect("test setup");
            let s = d.sum(&[1.0, rank as f64]).expect("test setup");
            // gradients of 3 sizes, one bigger than a bucket
            let big = BUCKET_BYTES / 4 + 10;
            let grads = [
                Tensor::full([3], rank as f64 + 1.0, (Kind::Float, tch::Device::Cpu)),
                Tensor::full([big], 2.0 * rank as f64, (Kind::Float, tch::Device::Cpu)),
                Tensor::full([2, 2], 4.0, (Kind::Float, tch::Device::Cpu)),
            ];
            d.average_gradients(&grads).expect("test setup");
            let state = [Tensor::full([2], 10.0 + rank as f64, (Kind::Float, tch::Device::Cpu))];
            d.copy_from_main(&state).expect("test setup");
            let gathered = |digest: &[u8; 32]| d.agree_and_gather("settings", Ok(()), &digest_payload(digest)).expect("gathered").1;
            let rows = gathered(&[7u8; 32]);
            let same = d.check_same("settings", &rows.iter().map(Vec::as_slice).collect::<Vec<_>>()).is_ok();
            let mut digest = [7u8; 32];
            digest[31] = rank as u8;
            let rows = gathered(&digest);
            let differ = d.check_same("settings", &rows.iter().map(Vec::as_slice).collect::<Vec<_>>()).map_err(|e| e.to_string());
            let agreed =
                d.agree("opening", if rank == 1 { Err(TrainError::Loader("x".into())) } else { Ok(()) }).map_err(|e| e.to_string());
            (
                s,
                grads.iter().map(|g| g.mean(Kind::Double).double_value(&[])).collect::<Vec<_>>(),
                state[0].double_value(&[1]),
                same,
                differ,
                agreed,
            )
        };
        let other = std::thread::spawn(move || run(1));
        let mine = run(0);
        let theirs = other.join().expect("test setup");
        for (rank, r) in [(0, &mine), (1, &theirs)] {
            assert_eq!(r.0, vec![2.0, 1.0], "rank {rank}");
            assert_eq!(r.1, vec![1.5, 1.0, 4.0], "rank {rank}: means of the gradients");
            assert_eq!(r.2, 10.0, "rank {rank}: rank 0's state everywhere");
            assert!(r.3);
        }
        assert_eq!(
            mine.4.clone().expect_err("fails"),
            "rank 0 of 2: settings of rank(s) 1 differ from rank 0's: start every rank with the same arguments"
        );
        assert!(theirs.4.is_err());
        assert_eq!(mine.5.clone().expect_err("fails"), "rank 0 of 2: opening failed on rank(s) 1 (see their output)");
        assert_eq!(theirs.5.clone().expect_err("fails"), "the loader's threads x");
    }
}
