//! Finding, loading and initialising a net plugin, once per process: plugins such as TCPX refuse a
//! second `init` ("gpu lib init twice"), so every engine of the process shares one [`Plugin`].
//! When another consumer of the process (NCCL) loaded the same library first, its image's `init` is
//! spent: the transport then loads a private image of it (`image.rs`), or fails saying why.
//!
//! The table's name picks the vendor's profile ([`profile_of`]) before `init`: a plugin whose failed
//! `init` ends the process (TCPXO) is initialised only when `UCCL_TCPX_TRANSPORT` names it, with
//! the engine's GPU current, and one that shares `init` across consumers is never copied.
//!
//! Every call into a loaded plugin goes through [`Plugin::call`], which holds the plugin's one lock:
//! TCPX's lazy per-GPU setup and its comms' request rings take no lock of their own (NCCL drives it
//! from its proxy threads), while this process reaches it from the progress thread, handshake
//! threads and callers registering memory. Connect and accept return at once and are polled, so the
//! lock is held for one call at a time, never across a wait.

use std::ffi::{CStr, OsString, c_int};
use std::path::Path;
use std::sync::Arc;

use libloading::os::unix::Library;
use parking_lot::{Mutex, const_mutex};

use super::image::{self, PrivateImage};
use super::profile::Profile;
use super::{devices, logger};
use crate::config::TransportChoice;
use crate::cuda::gpu::{self as gpu, Gpu};
use crate::error::{Error, Result};
use crate::ncclnet::{NCCL_SUCCESS, NcclNetPropertiesV7, NcclNetV7, PLUGIN_SYMBOL_V7};
use crate::transport::Properties;

/// More devices than this is a plugin bug, not a host.
const MAX_DEVICES: c_int = crate::config::MAX_NET_DEVICES as c_int;

/// A loaded, initialised plugin: its function table (copied out of the library) and its devices.
pub struct Plugin {
    /// Private: reached only through [`Plugin::call`].
    table: NcclNetV7,
    /// Held for the duration of every call into the plugin.
    calls: Mutex<()>,
    /// The table's `name`, e.g. "GPUDirectTCPX_v7"; peers must use the same plugin.
    pub name: &'static str,
    /// Its vendor's rules, picked by `name`.
    pub profile: &'static Profile,
    /// What a peer's plugin must agree on besides `name` (`Profile::agreement`), read once, with
    /// the environment the plugin's `init` read.
    pub agreement: &'static str,
    /// What was loaded, as given (a path or a library name dlopen searched for).
    pub origin: String,
    pub devices: Vec<Properties>,
    /// Keeps the code mapped; RTLD_NODELETE keeps it mapped even past this.
    _image: Image,
}

/// Where a plugin's code was loaded.
enum Image {
    /// The process's image of the library (the default namespace).
    Shared { _library: Library },
    /// A private image, because another consumer holds the shared one.
    Private { _image: PrivateImage },
    /// A table of this process (the mock in tests).
    #[cfg(test)]
    None,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("origin", &self.origin).finish()
    }
}

impl Plugin {
    fn new(table: NcclNetV7, name: &'static str, origin: String, devices: Vec<Properties>, image: Image) -> Plugin {
        let profile = profile_of(name);
        let agreement = Box::leak(super::profile::agreement(profile).into_boxed_str());
        Plugin { table, calls: const_mutex(()), name, profile, agreement, origin, devices, _image: image }
    }

    /// Runs `f`, which makes one call into the plugin through the table it is given, with no other
    /// thread of the process inside the plugin. `f` must not wait for anything but that call.
    pub fn call<R>(&self, f: impl FnOnce(&NcclNetV7) -> R) -> R {
        let _inside = self.calls.lock();
        f(&self.table)
    }
}

/// The profile of the plugin whose table is named `name`: TCPXO's for "FasTrak" (and the fake's
/// "FakeFasTrak"), TCPX's for any other, whose rules are the strictest the driver knows.
pub fn profile_of(name: &str) -> &'static Profile {
    if name.contains("FasTrak") { &super::tcpxo::PROFILE } else { &super::tcpx::PROFILE }
}

/// Where to look: the explicit path alone when given (falling back from a file the user named to
/// some other library would be a surprise), else the names NCCL tries, in NCCL's order, with the
/// wanted vendor's own names (`Profile::libraries`) before NCCL's default.
pub fn candidates(explicit: Option<&Path>, nccl_net_plugin: Option<&str>, choice: TransportChoice) -> Vec<OsString> {
    if let Some(path) = explicit {
        return vec![path.as_os_str().to_owned()];
    }
    let mut names = Vec::new();
    if let Some(name) = nccl_net_plugin {
        names.push(format!("libnccl-net-{name}.so").into());
    }
    if let Some(wanted) = wanted(choice) {
        names.extend(wanted.libraries.iter().map(OsString::from));
    }
    names.push("libnccl-net.so".into());
    names
}

/// The profile a choice names (`None`: `auto`, any plugin but one whose `init` is fatal).
fn wanted(choice: TransportChoice) -> Option<&'static Profile> {
    match choice {
        TransportChoice::Tcpx => Some(&super::tcpx::PROFILE),
        TransportChoice::Tcpxo => Some(&super::tcpxo::PROFILE),
        TransportChoice::Auto | TransportChoice::Socket => None,
    }
}

/// Whether `choice` takes the plugin `name` of `origin` (its `profile`), refused saying why;
/// `initialised`: the engines already hold its initialised plugin, so no `init` of theirs runs.
pub fn accepts(choice: TransportChoice, origin: &str, name: &str, initialised: bool) -> Result<()> {
    let profile = profile_of(name);
    match wanted(choice) {
        Some(w) if w.vendor != profile.vendor => Err(Error::backend(format!(
            "net plugin {origin} ({name}) is {}, not the {} that UCCL_TCPX_TRANSPORT={} asks for: set \
             UCCL_TCPX_TRANSPORT={} (docs/TCPXO.md)",
            profile.vendor,
            w.vendor,
            choice.name(),
            if profile.init_is_fatal { "tcpxo" } else { "tcpx" },
        ))),
        None if profile.init_is_fatal && !initialised => Err(Error::backend(format!(
            "net plugin {origin} ({name}) is {}, whose failed init ends the process: `auto` never loads it; set \
             UCCL_TCPX_TRANSPORT=tcpxo to use it (docs/TCPXO.md)",
            profile.vendor
        ))),
        _ => Ok(()),
    }
}

/// A plugin this process initialised, or the error its `init` gave: it must not be called a second
/// time.
struct Loaded {
    /// The address of the table symbol in the process's shared image of the library (the same
    /// library reached through two paths is one entry), whichever image the engines use.
    table: usize,
    outcome: Result<Arc<Plugin>>,
}

static LOADED: Mutex<Vec<Loaded>> = Mutex::new(Vec::new());

/// Loads the first candidate that works and that `choice` takes; the error lists why each failed.
/// `gpu`: the engine's GPU where it is known, current around an `init` that needs one.
pub fn load(
    explicit: Option<&Path>,
    nccl_net_plugin: Option<&str>,
    choice: TransportChoice,
    gpu: Option<i32>,
) -> Result<Arc<Plugin>> {
    let mut failures = Vec::new();
    for candidate in candidates(explicit, nccl_net_plugin, choice) {
        match load_one(&candidate, choice, gpu) {
            Ok(plugin) => return Ok(plugin),
            Err(e) if explicit.is_some() => return Err(e),
            Err(e) => failures.push(e.message().to_owned()),
        }
    }
    Err(Error::backend(format!("no net plugin could be loaded: {}", failures.join("; "))))
}

fn load_one(candidate: &OsString, choice: TransportChoice, gpu: Option<i32>) -> Result<Arc<Plugin>> {
    let origin = candidate.to_string_lossy().into_owned();
    let mut loaded = LOADED.lock();
    if let Some(shared) = image::already_loaded(candidate) {
        if let Some(ours) = loaded.iter().find(|l| l.table == shared) {
            return cached(&ours.outcome, choice, &origin);
        }
        // Loaded, and not by us: another consumer (NCCL) ran its init. A plugin that shares its
        // init is used as it is (loaded again below); one that refuses a second init is copied.
        // SAFETY: the table symbol of a loaded image, valid and aligned while it stays mapped.
        let name = table_name(&unsafe { std::ptr::read_volatile(shared as *const NcclNetV7) }, &origin)?;
        // Our `init` of it would still run (TCPXO sets up the current GPU in each, fatally).
        accepts(choice, &origin, name, false)?;
        if profile_of(name).init_once_per_image {
            let outcome = load_private(shared, &origin);
            loaded.push(Loaded { table: shared, outcome: outcome.clone() });
            return outcome;
        }
    }
    // SAFETY: loading runs the library's initialisers; loading a net plugin is what the caller
    // asked for. NODELETE: a plugin's helper threads may outlive any handle we hold.
    let library = unsafe { Library::open(Some(candidate), libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE) }
        .map_err(|e| Error::backend(format!("cannot load net plugin {origin}: {}", dl_text(&e))))?;
    // SAFETY: `ncclNetPlugin_v7` is a data symbol holding an `NcclNetV7`; only its address is read here.
    let symbol = unsafe { library.get::<*const NcclNetV7>(PLUGIN_SYMBOL_V7) }.map_err(|e| {
        Error::backend(format!("net plugin {origin} does not export ncclNetPlugin_v7: {}", dl_text(&e)))
    })?;
    let table_ptr: *const NcclNetV7 = *symbol;
    if table_ptr.is_null() {
        return Err(Error::backend(format!("net plugin {origin} exports a NULL ncclNetPlugin_v7")));
    }
    if let Some(ours) = loaded.iter().find(|l| l.table == table_ptr as usize) {
        return cached(&ours.outcome, choice, &origin);
    }
    // SAFETY: as in `initialise`: a valid table for the library's lifetime.
    let name = table_name(&unsafe { std::ptr::read_volatile(table_ptr) }, &origin)?;
    // Refused before `init`: nothing to remember, another choice or GPU may still take it.
    accepts(choice, &origin, name, false)?;
    let init_gpu = init_gpu(profile_of(name), gpu)?;
    // From here on `init` may have been called, so the outcome, success or not, is final.
    let outcome = initialise(table_ptr, &origin, Image::Shared { _library: library }, init_gpu);
    loaded.push(Loaded { table: table_ptr as usize, outcome: outcome.clone() });
    outcome
}

/// An outcome this process already has, if `choice` takes its plugin.
fn cached(outcome: &Result<Arc<Plugin>>, choice: TransportChoice, origin: &str) -> Result<Arc<Plugin>> {
    if let Ok(plugin) = outcome {
        accepts(choice, origin, plugin.name, true)?;
    }
    outcome.clone()
}

/// A private image of the plugin `origin`, whose shared image (its table at `shared`) another consumer of
/// the process initialised.
fn load_private(shared: usize, origin: &str) -> Result<Arc<Plugin>> {
    log::warn!(
        "net plugin {origin} is already loaded in this process by another consumer (NCCL, say), whose init \
         it shares: loading a private image of it (a copy of the file, loaded as an image of its own)"
    );
    let private = format!("{origin} (private image)");
    let outcome = image::open_private(shared)
        .and_then(|(image, table)| initialise(table, &private, Image::Private { _image: image }, None));
    outcome.map_err(|e| {
        Error::new(
            e.status(),
            format!(
                "net plugin {origin} is already loaded and initialised by another consumer of this process (NCCL \
                 loads it as its net plugin), and a plugin's init works once per loaded image; its private image \
                 cannot be used: {}. Give this process's NCCL another net plugin",
                e.message()
            ),
        )
    })
}

/// Reads, checks and initialises the table at `table_ptr` of a loaded `image`, with GPU `gpu`'s
/// context current where one is given.
fn initialise(table_ptr: *const NcclNetV7, origin: &str, image: Image, gpu: Option<i32>) -> Result<Arc<Plugin>> {
    // SAFETY: the symbol is a valid, aligned table for the library's lifetime (kept by NODELETE);
    // volatile because plugins declare it `volatile`.
    let table = unsafe { std::ptr::read_volatile(table_ptr) };
    let name = table_name(&table, origin)?;
    check_entries(&table, origin, name)?;
    let _current = gpu.map(|ordinal| Gpu::open(ordinal)?.enter()).transpose()?;
    let devices = init_and_describe(table, name, origin)?;
    let plugin = Plugin::new(table, name, origin.to_owned(), devices, image);
    log::info!("loaded net plugin {} from {} with {} devices", plugin.name, plugin.origin, plugin.devices.len());
    Ok(Arc::new(plugin))
}

/// libloading's Display says only "dlopen failed"; the dlerror text is its source.
fn dl_text(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// The table's name, leaked once per plugin per process so the transport can report it as `&'static`.
fn table_name(table: &NcclNetV7, origin: &str) -> Result<&'static str> {
    if table.name.is_null() {
        return Err(Error::backend(format!("net plugin {origin}: ncclNetPlugin_v7 has a NULL name")));
    }
    // SAFETY: non-NULL name of a loaded table: a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(table.name) }.to_string_lossy();
    if name.is_empty() || name.len() > crate::proto::MAX_TRANSPORT_NAME_LEN {
        return Err(Error::backend(format!(
            "net plugin {origin}: name {name:?} must be 1..={} bytes",
            crate::proto::MAX_TRANSPORT_NAME_LEN
        )));
    }
    Ok(Box::leak(name.into_owned().into_boxed_str()))
}

/// Where a failed `init` ends the process, the checks that process would fail first, and the GPU
/// to make current around it (TCPXO finds its per-GPU state by `cuCtxGetDevice`,
/// `fo/fastrak_plugin.cc` `Init` L83-99, and ends the process without one, past ordinal 7 or with
/// more than 8 GPUs, `nccl_cuda/cuda_common.cc` `checkDeviceCount` L89). Without a CUDA driver there
/// is no GPU to make current (the fake NIC's host mode stands in for one).
fn init_gpu(profile: &Profile, gpu: Option<i32>) -> Result<Option<i32>> {
    if !profile.init_is_fatal || !crate::cuda::available() {
        return Ok(None);
    }
    let fail = |why: String| {
        Error::backend(format!("{}'s init would end the process: {why}; nothing was initialised", profile.vendor))
    };
    let ordinal = gpu.or_else(gpu::current_ordinal).ok_or_else(|| {
        fail("no GPU is named (UCCL_TCPX_GPU) and none is current on the thread creating the engine".into())
    })?;
    let count = gpu::device_count()?;
    if count > 8 || ordinal >= 8 {
        return Err(fail(format!("GPU {ordinal} of {count}: it serves at most 8 GPUs, ordinals 0-7")));
    }
    Ok(Some(ordinal))
}

/// Every entry this transport calls must be present; `regMrDmaBuf`, `iflush` (broken in TCPX) and
/// `getDeviceMr` are never called, nor `irecvConsumed` where the vendor's receives need none.
pub fn check_entries(t: &NcclNetV7, origin: &str, name: &str) -> Result<()> {
    let consumes = profile_of(name).consumes_receives;
    let entries = [
        ("init", t.init.is_some()),
        ("devices", t.devices.is_some()),
        ("getProperties", t.get_properties.is_some()),
        ("listen", t.listen.is_some()),
        ("connect", t.connect.is_some()),
        ("accept", t.accept.is_some()),
        ("regMr", t.reg_mr.is_some()),
        ("deregMr", t.dereg_mr.is_some()),
        ("isend", t.isend.is_some()),
        ("irecv", t.irecv.is_some()),
        ("test", t.test.is_some()),
        ("closeSend", t.close_send.is_some()),
        ("closeRecv", t.close_recv.is_some()),
        ("closeListen", t.close_listen.is_some()),
        ("irecvConsumed", t.irecv_consumed.is_some() || !consumes),
    ];
    let missing: Vec<&str> = entries.iter().filter(|(_, present)| !present).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(Error::backend(format!(
            "net plugin {origin} ({name}) leaves required entries NULL: {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

fn init_and_describe(table: NcclNetV7, name: &str, origin: &str) -> Result<Vec<Properties>> {
    let since = logger::mark();
    let fail =
        |what: String| Error::backend(format!("net plugin {origin} ({name}): {what}{}", logger::warning_suffix(since)));
    (profile_of(name).set_environment)();
    let (init, devices, get_properties) = (table.init.unwrap(), table.devices.unwrap(), table.get_properties.unwrap());
    // SAFETY: entries checked non-NULL; the logger lives for the whole process.
    let rc = unsafe { init(logger::logger()) };
    if rc != NCCL_SUCCESS {
        return Err(fail(format!("init failed with {}", rc_text(rc))));
    }
    let mut n: c_int = -1;
    // SAFETY: `n` is a valid out-pointer.
    let rc = unsafe { devices(&mut n) };
    if rc != NCCL_SUCCESS {
        return Err(fail(format!("devices failed with {}", rc_text(rc))));
    }
    if !(1..=MAX_DEVICES).contains(&n) {
        return Err(fail(format!("reports {n} devices (expected 1..={MAX_DEVICES})")));
    }
    (0..n)
        .map(|dev| {
            let mut raw = NcclNetPropertiesV7::default();
            // SAFETY: `dev` < the device count (the plugin does not check); `raw` is the exact v7 layout.
            let rc = unsafe { get_properties(dev, &mut raw) };
            if rc != NCCL_SUCCESS {
                return Err(fail(format!("getProperties({dev}) failed with {}", rc_text(rc))));
            }
            devices::from_raw(dev as usize, &raw, profile_of(name))
                .map_err(|e| e.context(format!("net plugin {origin}")))
        })
        .collect()
}

/// "rc 3 (internal error)".
pub fn rc_text(rc: c_int) -> String {
    let what = match rc {
        1 => "unhandled CUDA error",
        2 => "system error",
        3 => "internal error",
        4 => "invalid argument",
        5 => "invalid usage",
        6 => "remote error",
        7 => "in progress",
        _ => "unknown code",
    };
    format!("rc {rc} ({what})")
}

#[cfg(test)]
impl Plugin {
    /// A plugin made from a table in this process (the mock), bypassing dlopen and the cache.
    pub(crate) fn from_table(table: NcclNetV7) -> Result<Arc<Plugin>> {
        let name = table_name(&table, "test table")?;
        check_entries(&table, "test table", name)?;
        let devices = init_and_describe(table, name, "test table")?;
        Ok(Arc::new(Plugin::new(table, name, "test table".into(), devices, Image::None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: TransportChoice = TransportChoice::Auto;

    #[test]
    fn the_table_name_picks_the_profile() {
        assert_eq!(profile_of("FasTrak").vendor, "GPUDirect-TCPXO");
        assert_eq!(profile_of("FakeFasTrak").vendor, "GPUDirect-TCPXO");
        for name in ["GPUDirectTCPX_v7", "FakeDevmemTCPX_v7", "Mock"] {
            assert_eq!(profile_of(name).vendor, "GPUDirect-TCPX", "{name}");
        }
        let (x, xo) = (profile_of("GPUDirectTCPX_v7"), profile_of("FasTrak"));
        assert!(x.consumes_receives && x.host_requests && x.init_once_per_image && !x.init_is_fatal);
        assert!(!xo.consumes_receives && !xo.host_requests && !xo.init_once_per_image && xo.init_is_fatal);
    }

    #[test]
    fn candidate_order_follows_nccl_and_an_explicit_path_stands_alone() {
        assert_eq!(candidates(None, None, AUTO), vec![OsString::from("libnccl-net.so")]);
        assert_eq!(
            candidates(None, Some("tcpx"), TransportChoice::Tcpx),
            vec![OsString::from("libnccl-net-tcpx.so"), OsString::from("libnccl-net.so")]
        );
        // Google's installer renames TCPXO's plugin and puts a wrapper in libnccl-net.so's place.
        assert_eq!(
            candidates(None, None, TransportChoice::Tcpxo),
            vec![OsString::from("libnccl-net_internal.so"), OsString::from("libnccl-net.so")]
        );
        let explicit = Some(Path::new("/x/y.so"));
        assert_eq!(candidates(explicit, Some("tcpx"), TransportChoice::Tcpxo), vec![OsString::from("/x/y.so")]);
    }

    #[test]
    fn missing_library_names_the_path_and_dlerror() {
        let path = Path::new("/nonexistent/dir/libnccl-net-missing.so");
        let err = load(Some(path), None, AUTO, None).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/dir/libnccl-net-missing.so"), "{err}");
        // dlerror's own words, e.g. "...: cannot open shared object file: No such file or directory".
        assert!(err.contains("cannot open shared object file"), "{err}");
    }

    #[test]
    fn a_library_without_the_symbol_is_refused_by_name() {
        let err = load(Some(Path::new("libc.so.6")), None, AUTO, None).unwrap_err().to_string();
        assert!(err.contains("ncclNetPlugin_v7") && err.contains("libc.so.6"), "{err}");
        assert!(err.contains("undefined symbol"), "dlerror text included: {err}");
    }

    #[test]
    fn name_search_reports_every_attempt() {
        let err = load(None, Some("surely-not-installed-xyz"), AUTO, None).unwrap_err().to_string();
        assert!(err.contains("libnccl-net-surely-not-installed-xyz.so"), "{err}");
        assert!(err.contains("no net plugin could be loaded"), "{err}");
    }

    /// TCPXO only by name, never by `auto` before its init ran; `tcpx` and `tcpxo` each refuse the
    /// other's plugin, naming the choice that takes it; any other plugin goes as TCPX.
    #[test]
    fn each_choice_takes_its_vendors_plugin_and_auto_never_a_fatal_init() {
        use TransportChoice::{Tcpx, Tcpxo};
        for (choice, name, initialised) in [
            (AUTO, "GPUDirectTCPX_v7", false),
            (Tcpx, "Other", false),
            (Tcpxo, "FasTrak", false),
            (AUTO, "FasTrak", true),
        ] {
            assert!(accepts(choice, "lib.so", name, initialised).is_ok(), "{choice:?} {name} {initialised}");
        }
        let err = accepts(AUTO, "lib.so", "FasTrak", false).unwrap_err().to_string();
        assert!(err.contains("ends the process") && err.contains("UCCL_TCPX_TRANSPORT=tcpxo"), "{err}");
        let err = accepts(Tcpx, "lib.so", "FasTrak", true).unwrap_err().to_string();
        assert!(err.contains("is GPUDirect-TCPXO, not the GPUDirect-TCPX") && err.contains("=tcpxo"), "{err}");
        let err = accepts(Tcpxo, "lib.so", "GPUDirectTCPX_v7", false).unwrap_err().to_string();
        assert!(err.contains("not the GPUDirect-TCPXO") && err.contains("set UCCL_TCPX_TRANSPORT=tcpx "), "{err}");
    }

    #[test]
    fn irecv_consumed_is_required_only_where_receives_are_consumed() {
        // SAFETY: all-zero is a valid table: a NULL name and every entry None.
        let empty: NcclNetV7 = unsafe { std::mem::zeroed() };
        let err = check_entries(&empty, "x.so", "FasTrak").unwrap_err();
        assert!(!err.message().contains("irecvConsumed") && err.message().contains("init"), "{err}");
        let err = check_entries(&empty, "x.so", "Other").unwrap_err();
        assert!(err.message().contains("irecvConsumed"), "{err}");
    }

    #[test]
    fn rc_texts() {
        assert_eq!(rc_text(2), "rc 2 (system error)");
        assert_eq!(rc_text(42), "rc 42 (unknown code)");
    }
}
