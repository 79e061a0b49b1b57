//! Which image of a plugin library the transport uses. TCPX's `init` works once per loaded image
//! (`gpu_init`: "gpu lib init twice"), and another consumer in the process may have loaded and
//! initialised the same library already: NCCL loads `libnccl-net.so` as its net plugin when vLLM
//! and NIXL share a process. `dlopen` of the same file returns that image, whose `init` is spent.
//! A private image, the library loaded again into a new link-map namespace (`dlmopen`), has globals
//! of its own, so its `init` runs; it also has its own copies of the library's dependencies: its own
//! C library (whose environment is the array it was handed when loaded: the process's `setenv` may
//! free that array later, so the image gets a copy that stays valid) and, for TCPX, its own CUDA
//! driver and runtime.

use std::ffi::{CStr, CString, OsStr, c_void};
use std::os::unix::ffi::OsStrExt;
use std::ptr::NonNull;

use super::env;
use crate::error::{Error, Result};
use crate::ncclnet::{NcclNetV7, PLUGIN_SYMBOL_V7};

/// A library loaded into a namespace of its own, never unloaded (its helper threads may outlive
/// any handle, as with RTLD_NODELETE in the default namespace).
pub struct PrivateImage {
    _handle: NonNull<c_void>,
}

// SAFETY: a dl handle names a loaded object of the process; any thread may use it, and this one is
// only kept, never used after loading.
unsafe impl Send for PrivateImage {}
// SAFETY: as above; nothing is reached through a shared reference.
unsafe impl Sync for PrivateImage {}

/// The address of `ncclNetPlugin_v7` in the image of `path` the process's default namespace holds
/// already, loaded by anyone (by this name or another path to the same file); `None` when no such
/// image is loaded. Loads nothing (RTLD_NOLOAD).
pub fn already_loaded(path: &OsStr) -> Option<usize> {
    let path = CString::new(path.as_bytes()).ok()?;
    // SAFETY: RTLD_NOLOAD runs nothing and maps nothing: it returns a handle to an object already
    // loaded, with one more reference, or NULL.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        take_dl_error();
        return None;
    }
    let symbol = symbol_name();
    // SAFETY: a live handle and a NUL-terminated name; only the address is used.
    let table = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
    take_dl_error();
    // SAFETY: drops the reference RTLD_NOLOAD took; the object stays loaded for its other users.
    unsafe { libc::dlclose(handle) };
    (!table.is_null()).then_some(table as usize)
}

/// Loads `path` into a new link-map namespace and returns the image and its plugin table.
pub fn open_private(path: &OsStr, origin: &str) -> Result<(PrivateImage, *const NcclNetV7)> {
    let c_path = CString::new(path.as_bytes())
        .map_err(|_| Error::invalid(format!("net plugin path {origin:?} contains a NUL byte")))?;
    let handle = open_in_new_namespace(&c_path)?;
    let image = PrivateImage { _handle: handle };
    let symbol = symbol_name();
    // SAFETY: a live handle and a NUL-terminated name; the caller reads the table only as a
    // plain-data `NcclNetV7`.
    let table = unsafe { libc::dlsym(handle.as_ptr(), symbol.as_ptr()) };
    if table.is_null() {
        return Err(Error::backend(format!("its private image does not export ncclNetPlugin_v7: {}", take_dl_error())));
    }
    Ok((image, table.cast()))
}

/// `dlmopen(LM_ID_NEWLM)` of `path`, its C library given an environment that stays valid.
fn open_in_new_namespace(path: &CStr) -> Result<NonNull<c_void>> {
    take_dl_error();
    // SAFETY: loading runs the library's initialisers, in a namespace of their own; loading the
    // net plugin is what the caller asked for. RTLD_GLOBAL is not allowed with dlmopen.
    let handle = unsafe {
        libc::dlmopen(libc::LM_ID_NEWLM, path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE)
    };
    let Some(handle) = NonNull::new(handle) else {
        return Err(Error::backend(format!("dlmopen into a new namespace failed: {}", take_dl_error())));
    };
    pin_environment(handle);
    Ok(handle)
}

/// Points the private image's C library at a copy of the process environment that is never freed.
/// Its `environ` is the process's array as of loading, which the process's next `setenv` of a new
/// variable reallocates and frees (a plugin reading the environment then reads freed memory);
/// variables set later do not reach the image either way.
fn pin_environment(handle: NonNull<c_void>) {
    // SAFETY: a live handle and NUL-terminated names; only addresses are read.
    let (private, shared) = unsafe {
        (libc::dlsym(handle.as_ptr(), c"environ".as_ptr()), libc::dlsym(libc::RTLD_DEFAULT, c"environ".as_ptr()))
    };
    take_dl_error();
    if private.is_null() || private == shared {
        log::debug!("the net plugin's private image has no C library of its own to give an environment");
        return;
    }
    let strings: &'static [CString] = Box::leak(env::snapshot().into_boxed_slice());
    let mut pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    pointers.push(std::ptr::null());
    let array: &'static [*const libc::c_char] = Box::leak(pointers.into_boxed_slice());
    // SAFETY: `private` is the image's own `environ` (a `char **`), which nothing in the image reads
    // concurrently: it was just loaded and its `init` has not run. The array and its strings are
    // leaked, so they outlive every reader.
    unsafe { *private.cast::<*const *const libc::c_char>() = array.as_ptr() };
}

fn symbol_name() -> &'static CStr {
    CStr::from_bytes_with_nul(PLUGIN_SYMBOL_V7).expect("the plugin symbol name ends in its one NUL")
}

/// dlerror's text, which also clears it for the next call on this thread.
fn take_dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call on
    // this thread; it is copied at once.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        return "no error reported".into();
    }
    // SAFETY: non-NULL, NUL-terminated, see above.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_nobody_loaded_is_not_found_and_nothing_is_loaded() {
        let path = OsStr::new("/nonexistent/uccl-tcpx/libnccl-net-nowhere.so");
        assert_eq!(already_loaded(path), None);
        // libc is loaded, but it is no plugin.
        assert_eq!(already_loaded(OsStr::new("libc.so.6")), None);
    }

    const ENVIRONMENT_CHILD: &str = "transport::plugin::image::tests::child_private_environment";

    #[test]
    fn a_private_c_library_keeps_its_environment_when_the_process_grows_its_own() {
        testkit::child::ChildTest::new(ENVIRONMENT_CHILD).ignored().run();
    }

    #[test]
    #[ignore = "run by its parent, in a process of its own: it changes the environment"]
    fn child_private_environment() {
        assert!(testkit::child::is_child(ENVIRONMENT_CHILD), "run through its parent test");
        // A process that has set a variable before (an engine's plugin defaults, say) keeps its
        // environment in an array of the heap, which the next new variable may move and free.
        // SAFETY: this child runs one test on one thread; nothing reads the environment meanwhile.
        unsafe { std::env::set_var("UCCL_TCPX_TEST_FIRST", "x") };
        let handle = open_in_new_namespace(c"libc.so.6").unwrap();
        // SAFETY: the private C library's own lookup function, of the C signature below.
        let lookup = unsafe { libc::dlsym(handle.as_ptr(), c"getenv".as_ptr()) };
        assert!(!lookup.is_null());
        // SAFETY: `lookup` is the C library's variable lookup, `char *(const char *name)`.
        let lookup: extern "C" fn(*const libc::c_char) -> *const libc::c_char = unsafe { std::mem::transmute(lookup) };
        let read = |name: &CStr| {
            let value = lookup(name.as_ptr());
            // SAFETY: NULL or a NUL-terminated string of the private library's environment.
            (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_string_lossy().into_owned())
        };
        let before = env::snapshot();
        let path = before.iter().find_map(|e| e.to_str().ok()?.strip_prefix("PATH=").map(str::to_owned));
        // Enough new variables that the process moves its array, freeing the one the private
        // library was handed when loaded.
        for i in 0..512 {
            // SAFETY: this child runs one test on one thread; nothing reads the environment meanwhile.
            unsafe { std::env::set_var(format!("UCCL_TCPX_TEST_GROWN_{i}"), "x".repeat(64)) };
        }
        assert_eq!(read(c"PATH"), path, "the private library reads the environment it was loaded with");
        assert_eq!(read(c"UCCL_TCPX_TEST_GROWN_0"), None, "variables set later do not reach it");
    }

    #[test]
    fn a_private_image_that_cannot_load_says_why() {
        let err = open_private(OsStr::new("/nonexistent/uccl-tcpx/libx.so"), "x").err().unwrap();
        assert!(err.message().contains("dlmopen") && err.message().contains("libx.so"), "{err}");
    }
}
