//! Which image of a plugin library the transport uses. TCPX's `init` works once per loaded image
//! (`gpu_init`: "gpu lib init twice"), and another consumer in the process may have loaded and
//! initialised the same library already: NCCL loads `libnccl-net.so` as its net plugin when vLLM
//! and NIXL share a process. `dlopen` of the same file returns that image, whose `init` is spent.
//!
//! A private image is a copy of the library's bytes in an anonymous file (`memfd_create`, else an
//! unlinked file in `$TMPDIR`) loaded through `/proc/self/fd/N`. The dynamic loader tells objects
//! apart by device and inode, so the copy is an image of its own, with globals of its own (its
//! `init` runs), while it lives in the process's one namespace and shares the objects it depends on
//! with everyone else: the C library, the CUDA driver and runtime. A second link-map namespace
//! (`dlmopen`) would bring second copies of those, and CUDA in two namespaces of one process
//! crashes it.
//!
//! The copy's references to its own exported globals resolve to itself only while the shared image
//! is out of the global scope, as NCCL loads it (RTLD_LOCAL); a shared image loaded RTLD_GLOBAL
//! would capture them, so then no copy is made and the caller is told why.

use std::ffi::{CStr, CString, OsStr, c_void};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::ncclnet::{NcclNetV7, PLUGIN_SYMBOL_V7};

/// What an anonymous copy is called in `/proc/self/maps` (`/memfd:` and this, then the file name).
const COPY_NAME_PREFIX: &str = "uccl-tcpx-private:";

/// A private copy of a library, loaded and never unloaded (its helper threads may outlive any
/// handle, as with RTLD_NODELETE in the default namespace).
pub struct PrivateImage {
    _handle: NonNull<c_void>,
    /// The anonymous file, never closed: the loader knows the image by the name `/proc/self/fd/N`,
    /// and a later `dlopen` of that name, were `N` reused for another file, would return this image.
    _fd: RawFd,
}

// SAFETY: a dl handle names a loaded object of the process; any thread may use it, and this one is
// only kept, never used after loading.
unsafe impl Send for PrivateImage {}
// SAFETY: as above; nothing is reached through a shared reference.
unsafe impl Sync for PrivateImage {}

/// The address of `ncclNetPlugin_v7` in the image of `path` the process holds already, loaded by
/// anyone (by this name or another path to the same file); `None` when no such image is loaded.
/// Loads nothing (RTLD_NOLOAD).
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

/// Loads a private copy of the library whose shared image holds the plugin table at `shared_table`,
/// and returns the copy and its own table.
pub fn open_private(shared_table: usize) -> Result<(PrivateImage, *const NcclNetV7)> {
    refuse_global(shared_table)?;
    let file = file_of(shared_table)?;
    let image = load_copy(&file)?;
    let symbol = symbol_name();
    // SAFETY: a live handle and a NUL-terminated name; the caller reads the table only as a
    // plain-data `NcclNetV7`.
    let table = unsafe { libc::dlsym(image._handle.as_ptr(), symbol.as_ptr()) };
    if table.is_null() {
        return Err(Error::backend(format!("its private copy does not export ncclNetPlugin_v7: {}", take_dl_error())));
    }
    if table as usize == shared_table {
        return Err(Error::backend("its private copy resolved to the shared image (the same table)"));
    }
    Ok((image, table.cast()))
}

/// A shared image in the global scope would capture the copy's references to its own globals.
fn refuse_global(shared_table: usize) -> Result<()> {
    let symbol = symbol_name();
    // SAFETY: a NUL-terminated name looked up in the global scope; only the address is compared.
    let global = unsafe { libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr()) };
    take_dl_error();
    if global as usize == shared_table {
        return Err(Error::backend(
            "the shared image was loaded RTLD_GLOBAL, so a private copy's references to its own globals would \
             resolve to that image; no copy was made",
        ));
    }
    Ok(())
}

/// The file the process's image holding `address` was loaded from.
fn file_of(address: usize) -> Result<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `info` is a valid out-pointer; dladdr only reads the loader's tables.
    let found = unsafe { libc::dladdr(address as *const c_void, info.as_mut_ptr()) };
    // SAFETY: zero-initialised, and filled in when dladdr succeeded.
    let info = unsafe { info.assume_init() };
    if found == 0 || info.dli_fname.is_null() {
        return Err(Error::backend("the file of its shared image cannot be found (dladdr)"));
    }
    // SAFETY: non-NULL, a NUL-terminated name the loader keeps while the object is loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    if name.is_empty() {
        return Err(Error::backend("the file of its shared image has no name (dladdr)"));
    }
    Ok(PathBuf::from(OsStr::from_bytes(name.to_bytes())))
}

/// Copies `file` into an anonymous file and loads that.
fn load_copy(file: &Path) -> Result<PrivateImage> {
    let fail = |what: &str, e: std::io::Error| Error::backend(format!("{what} {}: {e}", file.display()));
    let mut source = File::open(file).map_err(|e| fail("cannot open", e))?;
    let name = file.file_name().unwrap_or(file.as_os_str());
    let mut copy = anonymous_file(name).map_err(|e| fail("cannot make an anonymous file for a copy of", e))?;
    std::io::copy(&mut source, &mut copy).map_err(|e| fail("cannot copy", e))?;
    let handle = dlopen_fd(copy.as_raw_fd())?;
    Ok(PrivateImage { _handle: handle, _fd: copy.into_raw_fd() })
}

/// `dlopen` of the open file `fd`, by its `/proc/self/fd` name.
fn dlopen_fd(fd: RawFd) -> Result<NonNull<c_void>> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number");
    take_dl_error();
    // SAFETY: loading runs the copy's initialisers, as loading the net plugin the caller asked for
    // would. NODELETE: a plugin's helper threads may outlive any handle we hold.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE) };
    NonNull::new(handle)
        .ok_or_else(|| Error::backend(format!("dlopen of its private copy failed: {}", take_dl_error())))
}

/// A file of no name, closed on exec: a memfd where the kernel offers one, else a file in
/// `$TMPDIR` that has no name (O_TMPFILE) or loses it at once.
fn anonymous_file(name: &OsStr) -> std::io::Result<File> {
    memfd(name).or_else(|memfd_error| {
        log::debug!("memfd_create failed ({memfd_error}); the plugin's private copy goes to $TMPDIR");
        unlinked_temp_file()
    })
}

fn memfd(name: &OsStr) -> std::io::Result<File> {
    // The kernel takes at most 249 bytes of a name; it only labels the mapping.
    let mut label = COPY_NAME_PREFIX.as_bytes().to_vec();
    label.extend(name.as_bytes().iter().filter(|b| **b != 0).take(249 - COPY_NAME_PREFIX.len()));
    let label = CString::new(label).expect("NUL bytes were left out");
    // SAFETY: a NUL-terminated name; the returned descriptor, if any, is owned by the File alone.
    let fd = unsafe { libc::memfd_create(label.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn unlinked_temp_file() -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let nameless =
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o700).open(&dir);
    if let Ok(file) = nameless {
        return Ok(file);
    }
    // Filesystems without O_TMPFILE: a fresh name, removed as soon as the file is open.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = dir.join(format!(".uccl-tcpx-plugin-{}-{nanos}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o700).open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
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
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_library_nobody_loaded_is_not_found_and_nothing_is_loaded() {
        let path = OsStr::new("/nonexistent/uccl-tcpx/libnccl-net-nowhere.so");
        assert_eq!(already_loaded(path), None);
        // libc is loaded, but it is no plugin.
        assert_eq!(already_loaded(OsStr::new("libc.so.6")), None);
    }

    fn written(mut file: File, bytes: &[u8]) -> File {
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        file
    }

    #[test]
    fn both_kinds_of_anonymous_file_are_distinct_files_without_a_name() {
        for (kind, file) in [("memfd", memfd(OsStr::new("libx.so"))), ("temp", unlinked_temp_file())] {
            let mut file = written(file.unwrap(), b"bytes of a library");
            let mut back = String::new();
            file.read_to_string(&mut back).unwrap();
            assert_eq!(back, "bytes of a library", "{kind}");
            assert_eq!(file.metadata().unwrap().nlink(), 0, "{kind}: no name in any directory");
            let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
            if kind == "memfd" {
                assert!(link.to_string_lossy().starts_with("/memfd:uccl-tcpx-private:libx.so"), "{link:?}");
            }
        }
        let (a, b) = (memfd(OsStr::new("a")).unwrap(), memfd(OsStr::new("a")).unwrap());
        assert_ne!(a.metadata().unwrap().ino(), b.metadata().unwrap().ino(), "each copy is a file of its own");
    }

    #[test]
    fn a_copy_that_is_no_library_says_why() {
        let dir = std::env::temp_dir().join(format!("uccl-tcpx-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("libnot-elf.so");
        std::fs::write(&path, b"not an ELF file").unwrap();
        let err = load_copy(&path).err().expect("no library");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.message().contains("dlopen of its private copy failed"), "{err}");
        let missing = load_copy(Path::new("/nonexistent/uccl-tcpx/libx.so")).err().expect("no file");
        assert!(missing.message().contains("cannot open /nonexistent/uccl-tcpx/libx.so"), "{missing}");
    }

    #[test]
    fn the_file_of_a_loaded_object_is_found_and_an_unmapped_address_is_refused() {
        // SAFETY: a NUL-terminated name looked up in the global scope; only the address is used.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) };
        let file = file_of(getpid as usize).unwrap();
        assert!(file.to_string_lossy().contains("libc"), "{file:?}");
        assert!(file_of(8).expect_err("nothing is mapped there").message().contains("dladdr"));
    }
}
