//! NCCL for the gradient all-reduce of data-parallel training on CUDA,
//! loaded at run time: `libnccl.so.2` is a dependency of `libtorch_cuda.so`
//! (torch 2.11 pins NCCL 2.28.9, which `scripts/setup.sh` installs on GPU
//! machines), so wherever CUDA loads, NCCL is already in the process, and
//! the binary still links only libtorch_cpu. The few NCCL and CUDA runtime
//! functions used here are looked up by name (no headers needed).
//!
//! All-reduces run on the CUDA default stream, the one libtorch's kernels
//! use, so they are ordered after the backward pass and before the
//! optimiser without a host sync. A watchdog thread bounds every collective:
//! when one has not finished within the timeout, or NCCL reports an
//! asynchronous error (a peer died), it aborts the communicator, which
//! frees the stream, prints one line and ends the process. A stalled
//! collective never becomes a hang.
//!
//! Never run on a GPU yet (no GPU was lent since it was written): see
//! `scripts/gpu-check-dist.sh`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

/// NCCL's `ncclUniqueId`: 128 opaque bytes made by one rank, shared with
/// the others to join one communicator.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueId {
    /// The bytes.
    pub internal: [u8; 128],
}

type Res = c_int;
type RawComm = *mut c_void;
const NCCL_SUCCESS: Res = 0;
const NCCL_IN_PROGRESS: Res = 7;
const NCCL_SUM: c_int = 0;
const CUDA_SUCCESS: c_int = 0;
const CUDA_NOT_READY: c_int = 600;
const CUDA_EVENT_DISABLE_TIMING: c_uint = 2;

/// The functions of libnccl and libcudart this module calls.
struct Api {
    version: i32,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Res,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Res,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> Res,
    group_start: unsafe extern "C" fn() -> Res,
    group_end: unsafe extern "C" fn() -> Res,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut Res) -> Res,
    comm_abort: unsafe extern "C" fn(RawComm) -> Res,
    comm_destroy: unsafe extern "C" fn(RawComm) -> Res,
    get_error_string: unsafe extern "C" fn(Res) -> *const c_char,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    event_create: unsafe extern "C" fn(*mut *mut c_void, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    event_query: unsafe extern "C" fn(*mut c_void) -> c_int,
    event_destroy: unsafe extern "C" fn(*mut c_void) -> c_int,
}

/// `dlopen` a library (already loaded ones are found by their soname).
fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: a NUL-terminated name; dlerror's string is copied at once.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if h.is_null() {
            let e = libc::dlerror();
            return Err(if e.is_null() {
                format!("{} not loadable", name.to_string_lossy())
            } else {
                CStr::from_ptr(e).to_string_lossy().into()
            });
        }
        Ok(h)
    }
}

/// The address of `name` in `lib`, as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the symbol's real C signature (a function pointer type).
unsafe fn symbol<F: Copy>(lib: *mut c_void, name: &CStr) -> Result<F, String> {
    // SAFETY: `lib` is a live handle, the name NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("{} not found", name.to_string_lossy()));
    }
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>(), "a function pointer");
    // SAFETY: the caller names the symbol's type; sizes checked above.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

fn load_api() -> Result<Api, String> {
    let nccl = open(c"libnccl.so.2")?;
    let cudart = open(c"libcudart.so.13")?;
    // SAFETY: every type below is the C signature from nccl.h (2.28) and
    // cuda_runtime_api.h (13.0).
    unsafe {
        let get_version: unsafe extern "C" fn(*mut c_int) -> Res = symbol(nccl, c"ncclGetVersion")?;
        let mut version = 0;
        if get_version(&mut version) != NCCL_SUCCESS {
            return Err("ncclGetVersion failed".into());
        }
        Ok(Api {
            version,
            get_unique_id: symbol(nccl, c"ncclGetUniqueId")?,
            comm_init_rank: symbol(nccl, c"ncclCommInitRank")?,
            all_reduce: symbol(nccl, c"ncclAllReduce")?,
            group_start: symbol(nccl, c"ncclGroupStart")?,
            group_end: symbol(nccl, c"ncclGroupEnd")?,
            comm_get_async_error: symbol(nccl, c"ncclCommGetAsyncError")?,
            comm_abort: symbol(nccl, c"ncclCommAbort")?,
            comm_destroy: symbol(nccl, c"ncclCommDestroy")?,
            get_error_string: symbol(nccl, c"ncclGetErrorString")?,
            set_device: symbol(cudart, c"cudaSetDevice")?,
            event_create: symbol(cudart, c"cudaEventCreateWithFlags")?,
            event_record: symbol(cudart, c"cudaEventRecord")?,
            event_query: symbol(cudart, c"cudaEventQuery")?,
            event_destroy: symbol(cudart, c"cudaEventDestroy")?,
        })
    }
}

/// NCCL, loaded once per process; the error says why it cannot be.
fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load_api).as_ref().map_err(Clone::clone)
}

/// The loaded NCCL's version, e.g. `2.28.9`; the error says why it does not load.
///
/// # Errors
/// `libnccl.so.2` or `libcudart.so.13` cannot be loaded, or lacks a function.
pub fn version() -> Result<String, String> {
    api().map(|a| format!("{}.{}.{}", a.version / 10000, a.version / 100 % 100, a.version % 100))
}

fn nccl_error(api: &Api, r: Res) -> String {
    // SAFETY: ncclGetErrorString returns a static string.
    let s = unsafe { (api.get_error_string)(r) };
    if s.is_null() { format!("NCCL error {r}") } else { unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned() }
}

/// A new unique id (on one rank, to be shared with the others).
///
/// # Errors
/// NCCL does not load, or fails.
pub fn unique_id() -> Result<UniqueId, String> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: a valid out pointer.
    match unsafe { (api.get_unique_id)(&mut id) } {
        NCCL_SUCCESS => Ok(id),
        r => Err(format!("ncclGetUniqueId: {}", nccl_error(api, r))),
    }
}

/// The NCCL data type of a tensor kind.
fn data_type(kind: Kind) -> Option<c_int> {
    Some(match kind {
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        _ => return None,
    })
}

/// What the watchdog watches: the collectives in flight (CUDA events
/// recorded after them, with the time they were issued) and the
/// communicator, once it exists.
struct Watched {
    pending: Mutex<Vec<(usize, Instant)>>,
    comm: AtomicUsize,
    stop: AtomicBool,
}

/// One rank's NCCL communicator, with its watchdog.
pub struct Comm {
    api: &'static Api,
    comm: RawComm,
    device: c_int,
    watched: Arc<Watched>,
    watchdog: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm").field("device", &self.device).finish_non_exhaustive()
    }
}

/// End the process after a collective failed: abort the communicator (which
/// stops its kernels, so nothing waits on them), print one line, exit 1
/// without running destructors that could wait on the device.
fn give_up(api: &Api, comm: usize, rank: usize, world: usize, what: &str) -> ! {
    eprintln!("error: data-parallel rank {rank} of {world}: {what} (another rank stopped or hangs; see its output)");
    if comm != 0 {
        // SAFETY: a communicator made by ncclCommInitRank, aborted once
        // (the process ends right after).
        unsafe { (api.comm_abort)(comm as RawComm) };
    }
    // SAFETY: _exit ends the process at once.
    unsafe { libc::_exit(1) }
}

impl Comm {
    /// Join the communicator of `world` ranks identified by `id` as `rank`,
    /// on CUDA device `device`, with `timeout` for joining and for every
    /// collective (enforced by the watchdog, which ends the process).
    ///
    /// # Errors
    /// NCCL does not load, or fails to set up.
    pub fn init(id: UniqueId, world: usize, rank: usize, device: usize, timeout: Duration) -> Result<Self, String> {
        let api = api()?;
        let device = c_int::try_from(device).map_err(|_| format!("CUDA device {device}"))?;
        // SAFETY: plain CUDA runtime call.
        if unsafe { (api.set_device)(device) } != CUDA_SUCCESS {
            return Err(format!("cudaSetDevice({device}) failed"));
        }
        let watched =
            Arc::new(Watched { pending: Mutex::new(vec![(0, Instant::now())]), comm: AtomicUsize::new(0), stop: AtomicBool::new(false) });
        let w = Arc::clone(&watched);
        let watchdog = std::thread::Builder::new()
            .name("caev2-nccl-watchdog".into())
            .spawn(move || watch(api, &w, device, rank, world, timeout))
            .map_err(|e| format!("starting the NCCL watchdog: {e}"))?;
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: a valid out pointer; the id by value, as nccl.h declares.
        let r = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        if let Ok(mut p) = watched.pending.lock() {
            p.clear();
        }
        let mut this = Self { api, comm, device, watched, watchdog: Some(watchdog) };
        if r != NCCL_SUCCESS || comm.is_null() {
            this.comm = std::ptr::null_mut();
            return Err(format!("ncclCommInitRank: {}", nccl_error(api, r)));
        }
        this.watched.comm.store(comm as usize, Ordering::SeqCst);
        Ok(this)
    }

    /// Sum every (contiguous CUDA) tensor over all ranks, in place, on the
    /// default stream: issued, not waited for.
    ///
    /// # Errors
    /// A tensor NCCL cannot reduce, or NCCL refusing the call.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), String> {
        let api = self.api;
        for t in tensors.iter() {
            if !t.device().is_cuda() || !t.is_contiguous() || data_type(t.kind()).is_none() {
                return Err(format!("NCCL cannot all-reduce a {:?} tensor on {:?}", t.kind(), t.device()));
            }
        }
        // SAFETY: CUDA and NCCL calls on live, contiguous device tensors of
        // the counts and types given; the null stream is libtorch's.
        unsafe {
            (api.set_device)(self.device);
            (api.group_start)();
            let mut first_error = NCCL_SUCCESS;
            for t in tensors.iter_mut() {
                let p = t.data_ptr();
                let dt = data_type(t.kind()).unwrap_or(7);
                let r = (api.all_reduce)(p, p, t.numel(), dt, NCCL_SUM, self.comm, std::ptr::null_mut());
                if first_error == NCCL_SUCCESS {
                    first_error = r;
                }
            }
            let r = (api.group_end)();
            if first_error != NCCL_SUCCESS || (r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS) {
                return Err(format!("ncclAllReduce: {}", nccl_error(api, if first_error != NCCL_SUCCESS { first_error } else { r })));
            }
            let mut event: *mut c_void = std::ptr::null_mut();
            if (api.event_create)(&mut event, CUDA_EVENT_DISABLE_TIMING) != CUDA_SUCCESS
                || (api.event_record)(event, std::ptr::null_mut()) != CUDA_SUCCESS
            {
                return Err("recording a CUDA event after the all-reduce failed".into());
            }
            if let Ok(mut p) = self.watched.pending.lock() {
                p.push((event as usize, Instant::now()));
            }
        }
        Ok(())
    }
}

/// The watchdog: every 20 ms, NCCL's asynchronous error and the collectives
/// in flight; past the timeout or on an error, [`give_up`].
fn watch(api: &'static Api, w: &Watched, device: c_int, rank: usize, world: usize, timeout: Duration) {
    // SAFETY: plain CUDA runtime call (events are queried on this device).
    unsafe { (api.set_device)(device) };
    while !w.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
        let comm = w.comm.load(Ordering::SeqCst);
        if comm != 0 {
            let mut e = NCCL_SUCCESS;
            // SAFETY: a live communicator (destroyed only after this thread stops).
            unsafe { (api.comm_get_async_error)(comm as RawComm, &mut e) };
            if e != NCCL_SUCCESS && e != NCCL_IN_PROGRESS {
                give_up(api, comm, rank, world, &format!("NCCL failed: {}", nccl_error(api, e)));
            }
        }
        let Ok(mut pending) = w.pending.lock() else { return };
        let mut failed = None;
        pending.retain(|&(event, since)| {
            if event == 0 {
                // joining the communicator
                if since.elapsed() > timeout {
                    failed = Some(format!("joining the NCCL communicator took over {} s", timeout.as_secs()));
                }
                return true;
            }
            // SAFETY: an event this module created and has not destroyed.
            match unsafe { (api.event_query)(event as *mut c_void) } {
                CUDA_SUCCESS => {
                    // SAFETY: as above; destroyed once, here.
                    unsafe { (api.event_destroy)(event as *mut c_void) };
                    false
                }
                CUDA_NOT_READY => {
                    if since.elapsed() > timeout {
                        failed = Some(format!("an NCCL all-reduce did not finish within {} s", timeout.as_secs()));
                    }
                    true
                }
                code => {
                    failed = Some(format!("CUDA error {code} while waiting for an NCCL all-reduce"));
                    true
                }
            }
        });
        if let Some(what) = failed {
            give_up(api, comm, rank, world, &what);
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.watched.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
        let pending: Vec<usize> =
            self.watched.pending.lock().map(|p| p.iter().map(|&(e, _)| e).filter(|&e| e != 0).collect()).unwrap_or_default();
        // SAFETY: events this module created and has not destroyed.
        let unfinished = pending.iter().any(|&e| unsafe { (self.api.event_query)(e as *mut c_void) } != CUDA_SUCCESS);
        if !self.comm.is_null() {
            // SAFETY: our communicator, freed once: destroyed when its work
            // is done, aborted when some is not (a run ending on an error,
            // where destroying would wait for peers that may be gone).
            unsafe {
                if unfinished {
                    (self.api.comm_abort)(self.comm);
                } else {
                    (self.api.comm_destroy)(self.comm);
                }
            }
        }
        for e in pending {
            // SAFETY: as above, destroyed once.
            unsafe { (self.api.event_destroy)(e as *mut c_void) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NCCL in the process (a CPU machine) the reason is one line
    /// that names the library; with it (a GPU machine), the version.
    #[test]
    fn loading_reports_the_version_or_why_not() {
        match version() {
            Ok(v) => assert!(v.starts_with("2."), "{v}"),
            Err(e) => {
                assert!(e.contains("libnccl.so.2") || e.contains("libcudart.so.13"), "{e}");
                assert!(!e.contains('\n'));
            }
        }
    }

    #[test]
    fn tensor_kinds_map_to_nccl_types() {
        assert_eq!(data_type(Kind::Float), Some(7));
        assert_eq!(data_type(Kind::BFloat16), Some(9));
        assert_eq!(data_type(Kind::Bool), None);
    }
}
