//! The net plugin already loaded and initialised by another consumer of the process, as NCCL does
//! when vLLM and NIXL share one: TCPX's `init` works once per loaded image, so the engine loads a
//! private image of the library (a copy of the file in an anonymous file, an image of its own in the
//! process's one namespace) and initialises that; when it cannot, `tcpx` fails naming the cause and
//! `auto` falls back to sockets.
//!
//! The fake NIC reproduces "init twice" per image. `init` is once per process image, so every case
//! runs in a child process, which first loads the fake as NCCL does (`dlopen` RTLD_LOCAL, `init`
//! with a logger) and only then creates engines.

use std::path::PathBuf;

use uccl_tcpx::{Config, Engine, TransportChoice, UcclStatus};

mod common;
use common::plugin::{Nccl, images_of, private_copies_of};
use common::{ChildTest, Pair, pair, pattern, plugin, wait};

const FAKE: &str = "FakeDevmemTCPX_v7";

fn child(name: &str) -> String {
    ChildTest::new(name).ignored().env("UCCL_TCPX_FAKE_PLUGIN", plugin::fake_plugin()).run()
}

fn moves_data(p: &Pair) {
    let data = pattern((2 << 20) + 9, 7);
    let mut src = data.clone();
    let mut dst = vec![0u8; data.len()];
    let smr = p.a.register(src.as_mut_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), data.len() as u64);
    assert_eq!(wait(&p.ba, r).unwrap(), data.len() as u64);
    common::assert_same(&dst, &data, "sent beside NCCL's image");
}

#[test]
fn engines_beside_nccl_use_a_private_image_of_the_plugin() {
    let out = child("child_engines_beside_nccl");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the plugin is initialised once per process image"]
fn child_engines_beside_nccl() {
    let path = plugin::fake_plugin();
    let nccl = Nccl::load(&path);
    assert_ne!(nccl.init(), 0, "NCCL's image is initialised: a second init there fails (init twice)");
    let p = pair(plugin::config(2, 256 << 10));
    assert_eq!((p.a.transport(), p.b.transport()), (FAKE, FAKE));
    assert_eq!(images_of(&path), 1, "NCCL's image, of the file itself");
    assert_eq!(private_copies_of(&path), 1, "the engines' private copy");
    moves_data(&p);
    // A third engine shares the engines' private image rather than loading another.
    let c = Engine::new(plugin::config(2, 256 << 10)).unwrap();
    assert_eq!(c.transport(), FAKE);
    assert_eq!((images_of(&path), private_copies_of(&path)), (1, 1));
    assert!(nccl.listen_works(), "NCCL's image still serves NCCL");
    println!("child checked");
}

#[test]
fn a_private_image_that_cannot_initialise_fails_tcpx_and_auto_falls_back() {
    let out = child("child_private_image_init_fails");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the plugin is initialised once per process image"]
fn child_private_image_init_fails() {
    let nccl = Nccl::load(&plugin::fake_plugin());
    // The fake reads its knobs in init: the private image's init, after NCCL's, meets a bad one.
    // SAFETY: this child runs one test and has started no thread that reads the environment.
    unsafe { std::env::set_var("FAKE_TCPX_NDEV", "0") };
    let err = Engine::new(plugin::config(2, 256 << 10)).err().expect("tcpx fails");
    let msg = err.to_string();
    for needle in ["UCCL_TCPX_TRANSPORT=tcpx", "already loaded", "private image", "init failed", "FAKE_TCPX_NDEV"] {
        assert!(msg.contains(needle), "{needle:?} missing: {msg}");
    }
    assert_eq!(err.status(), UcclStatus::ErrBackend, "{msg}");
    // The outcome is final: another engine gets the same answer without loading a third image.
    let again = Engine::new(plugin::config(2, 256 << 10)).err().expect("tcpx fails again");
    assert!(again.to_string().contains("FAKE_TCPX_NDEV"), "{again}");
    let auto = Engine::new(Config { transport: TransportChoice::Auto, ..plugin::config(2, 256 << 10) }).unwrap();
    assert_eq!(auto.transport(), "socket");
    assert!(nccl.listen_works(), "NCCL's image still serves NCCL");
    println!("child checked");
}

#[test]
fn a_copy_of_the_library_is_an_image_of_its_own() {
    let out = child("child_copy_of_the_library");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the plugin is initialised once per process image"]
fn child_copy_of_the_library() {
    let original = plugin::fake_plugin();
    let _nccl = Nccl::load(&original);
    // What a deployment can do instead: name a copy of the file, which dlopen loads as another
    // image in the process's own namespace.
    let dir = std::env::temp_dir().join(format!("uccl-tcpx-plugin-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy: PathBuf = dir.join("libnccl-net-copy.so");
    std::fs::copy(&original, &copy).unwrap();
    let p = pair(Config { plugin_path: Some(copy.clone()), ..plugin::config(2, 256 << 10) });
    assert_eq!(images_of(&copy), 1);
    assert_eq!(images_of(&original), 1, "NCCL's image");
    assert_eq!(private_copies_of(&original), 0, "no private copy of the original was needed");
    moves_data(&p);
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
    println!("child checked");
}

#[test]
fn a_shared_image_in_the_global_scope_is_not_copied_and_tcpx_says_why() {
    let out = child("child_shared_image_global");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the plugin is initialised once per process image"]
fn child_shared_image_global() {
    let path = plugin::fake_plugin();
    // A consumer that loads the plugin into the global scope: a copy's references to its own
    // globals would resolve to this image, so the engines refuse to make one.
    let nccl = Nccl::load_with(&path, libc::RTLD_NOW | libc::RTLD_GLOBAL);
    let err = Engine::new(plugin::config(2, 256 << 10)).err().expect("tcpx fails");
    let msg = err.to_string();
    for needle in ["already loaded", "private image", "RTLD_GLOBAL"] {
        assert!(msg.contains(needle), "{needle:?} missing: {msg}");
    }
    assert_eq!(private_copies_of(&path), 0, "no copy was loaded");
    let auto = Engine::new(Config { transport: TransportChoice::Auto, ..plugin::config(2, 256 << 10) }).unwrap();
    assert_eq!(auto.transport(), "socket");
    assert!(nccl.listen_works(), "NCCL's image still serves NCCL");
    println!("child checked");
}
