//! GPUDirect-TCPXO's plugin ("FasTrak", A3-Mega) under its own profile, against the fake NIC in
//! TCPXO mode (`FAKE_TCPX_PLUGIN_KIND=tcpxo`, host mode here; GPU memory in `plugin_gpu.rs`): the
//! loader takes it only when `UCCL_TCPX_TRANSPORT=tcpxo` names it (a failed `init` of it ends the
//! process, so `auto` must never run one), shares an `init` another consumer already ran instead
//! of copying the library, connects over its handle and device-handle rules, and refuses host
//! memory, which TCPXO refuses in requests, before the plugin sees it.
//!
//! The fake picks its kind when the library loads, so every case runs in a child process.

use uccl_tcpx::{Config, Engine, TransportChoice, UcclStatus};

mod common;
use common::plugin::{Nccl, images_of, private_copies_of};
use common::{ChildTest, pair, pattern, plugin};

const FAKE_TCPXO: &str = "FakeFasTrak";

fn child(name: &str, kind: &str) -> String {
    ChildTest::new(name)
        .ignored()
        .env_cleared("FAKE_TCPX_")
        .env("FAKE_TCPX_PLUGIN_KIND", kind)
        .env("FAKE_TCPX_SAME_HOST", "allow")
        .env("UCCL_TCPX_FAKE_PLUGIN", plugin::fake_plugin())
        .run()
}

fn config(transport: TransportChoice) -> Config {
    Config { transport, ..plugin::config(2, 256 << 10) }
}

#[test]
fn auto_and_tcpx_never_initialise_tcpxo_and_tcpxo_takes_it() {
    let out = child("child_choices_over_tcpxo", "tcpxo");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the fake's kind is fixed when it loads"]
fn child_choices_over_tcpxo() {
    // A bad knob makes TCPXO's first `init` end the process: had `auto` or `tcpx` initialised the
    // plugin, this child would not get past them.
    // SAFETY: this child runs one test and has started no thread that reads the environment.
    unsafe { std::env::set_var("FAKE_TCPX_NDEV", "0") };
    let auto = Engine::new(config(TransportChoice::Auto)).expect("auto falls back");
    assert_eq!(auto.transport(), "socket");
    let err = Engine::new(config(TransportChoice::Tcpx)).err().expect("tcpx refuses TCPXO").to_string();
    for needle in ["GPUDirect-TCPXO", "UCCL_TCPX_TRANSPORT=tcpx", "set UCCL_TCPX_TRANSPORT=tcpxo"] {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("FAKE_TCPX_NDEV") };
    let p = pair(config(TransportChoice::Tcpxo));
    assert_eq!((p.a.transport(), p.b.transport()), (FAKE_TCPXO, FAKE_TCPXO));
    // Once initialised, `auto` takes the process's TCPXO as it is; `tcpx` still refuses it.
    assert_eq!(Engine::new(config(TransportChoice::Auto)).unwrap().transport(), FAKE_TCPXO);
    assert!(Engine::new(config(TransportChoice::Tcpx)).is_err());
    println!("child checked");
}

#[test]
fn tcpxo_refuses_a_tcpx_plugin() {
    let out = child("child_tcpxo_refuses_tcpx", "tcpx");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the fake's kind is fixed when it loads"]
fn child_tcpxo_refuses_tcpx() {
    let err = Engine::new(config(TransportChoice::Tcpxo)).err().expect("tcpxo refuses TCPX").to_string();
    for needle in
        ["GPUDirect-TCPX,", "not the GPUDirect-TCPXO", "UCCL_TCPX_TRANSPORT=tcpxo", "set UCCL_TCPX_TRANSPORT=tcpx "]
    {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    // Refused before its `init`: `tcpx` still initialises it afterwards.
    assert_eq!(Engine::new(config(TransportChoice::Tcpx)).unwrap().transport(), "FakeDevmemTCPX_v7");
    println!("child checked");
}

#[test]
fn beside_nccl_the_engines_share_its_image_and_init() {
    let out = child("child_tcpxo_beside_nccl", "tcpxo");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the fake's kind is fixed when it loads"]
fn child_tcpxo_beside_nccl() {
    let path = plugin::fake_plugin();
    let nccl = Nccl::load(&path);
    assert_eq!(nccl.init(), 0, "TCPXO's init is shared: a second one returns the first's outcome");
    let p = pair(config(TransportChoice::Tcpxo));
    assert_eq!(p.a.transport(), FAKE_TCPXO);
    assert_eq!((images_of(&path), private_copies_of(&path)), (1, 0), "NCCL's image, no copy");
    assert!(nccl.listen_works(), "NCCL's image still serves NCCL");
    println!("child checked");
}

#[test]
fn host_memory_is_refused_before_the_plugin_and_the_connection_goes_on() {
    let out = child("child_tcpxo_host_memory", "tcpxo");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the fake's kind is fixed when it loads"]
fn child_tcpxo_host_memory() {
    let p = pair(config(TransportChoice::Tcpxo));
    let len = 1 << 20;
    let src = pattern(len, 9);
    let mut dst = vec![0u8; len];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let fifo = p.b.prepare_fifo(dmr, dst.as_ptr() as usize, dst.len()).unwrap();
    let one = |len: usize| uccl_tcpx::OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: fifo };
    let refused = |what: &str, err: uccl_tcpx::Error| {
        assert_eq!(err.status(), UcclStatus::ErrNotSupported, "{what}: {err}");
        assert!(err.to_string().contains("the FakeFasTrak transport moves GPU memory only"), "{what}: {err}");
    };
    // Any size: one rule for every host region, whichever way its bytes would go.
    for n in [4 << 10, len] {
        refused("write", p.ab.write(&[one(n)]).expect_err("host memory over TCPXO"));
        refused("read", p.ab.read(&[one(n)]).expect_err("host memory over TCPXO"));
        refused("send", p.ab.send(&[(smr, src.as_ptr() as usize, n)]).expect_err("host memory over TCPXO"));
    }
    refused("recv", p.ba.recv(dmr, dst.as_mut_ptr() as usize, len).expect_err("host memory over TCPXO"));
    assert!(dst.iter().all(|&b| b == 0), "nothing landed");
    // The connection goes on: a notification still arrives.
    p.ab.notify(b"tcpxo-agent", b"still here").unwrap();
    let mut got = Vec::new();
    common::wait_until("the notification arrives", common::PATIENCE, || {
        got.extend(uccl_tcpx::drain_notifications(16).into_iter().filter(|n| n.name == b"tcpxo-agent"));
        !got.is_empty()
    });
    assert_eq!(got[0].msg, b"still here");
    println!("child checked");
}

/// TCPXO pairs the k-th send with the k-th receive across each comm's flows, each end with the
/// count its own environment gave (`NCCL_FASTRAK_NUM_FLOWS`): ends that differ would pair wrongly,
/// so they refuse each other in the handshake, naming both counts; ends whose settings come to the
/// same count (unset and `2`) connect.
#[test]
fn ends_with_different_flow_counts_refuse_each_other() {
    let out = child("child_tcpxo_flows_acceptor", "tcpxo");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent: the fake's kind is fixed when it loads"]
fn child_tcpxo_flows_acceptor() {
    let engine = std::sync::Arc::new(Engine::new(config(TransportChoice::Tcpxo)).unwrap());
    for (flows, expect) in [("4", "refused"), ("2", "connected")] {
        let mut peer = ChildTest::new("child_tcpxo_flows_peer")
            .ignored()
            .env("ACCEPTOR_PORT", engine.address().port().to_string())
            .env("NCCL_FASTRAK_NUM_FLOWS", flows)
            .env("EXPECT", expect)
            .spawn();
        if expect == "connected" {
            let conn = common::accept(&engine).unwrap();
            assert_eq!(conn.peer.channels, FAKE_TCPXO);
        }
        peer.announcement(&format!("PEER {expect}"), common::PATIENCE);
    }
    println!("child checked");
}

#[test]
#[ignore = "runs as the peer process of child_tcpxo_flows_acceptor"]
fn child_tcpxo_flows_peer() {
    let port: u16 = std::env::var("ACCEPTOR_PORT").unwrap().parse().unwrap();
    let expect = std::env::var("EXPECT").unwrap();
    let engine = Engine::new(config(TransportChoice::Tcpxo)).unwrap();
    match (expect.as_str(), engine.connect("127.0.0.1", "0", port)) {
        ("refused", Err(e)) => {
            assert_eq!(e.status(), UcclStatus::ErrNotSupported, "{e}");
            for needle in ["FakeFasTrak flows=4", "FakeFasTrak flows=2"] {
                assert!(e.to_string().contains(needle), "{needle:?} missing: {e}");
            }
        }
        ("connected", Ok(_)) => {}
        (expect, got) => panic!("expected {expect}, got {:?}", got.map(|_| "a connection")),
    }
    println!("PEER {expect}");
    testkit::child::park_until_killed()
}
