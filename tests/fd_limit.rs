//! The open-file limit: engines raise the soft limit to the hard one, and a connection refused for
//! lack of descriptors says which limit was reached instead of a bare "Too many open files".

mod common;

use common::engine::loopback;
use testkit::child::ChildTest;
use uccl_tcpx::Engine;

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a writable rlimit that outlives the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit
}

#[test]
fn an_engine_raises_the_soft_limit_and_names_it_when_it_runs_out() {
    // The serving engine lives in this process, so only the connecting child runs short.
    let server = Engine::new(loopback()).unwrap();
    ChildTest::new("running_out_of_descriptors")
        .ignored()
        .env_cleared("UCCL_TCPX_")
        .env("FD_LIMIT_TEST_PORT", server.address().port().to_string())
        .run();
    server.shutdown();
}

#[test]
#[ignore = "runs in a child process: it lowers the process's open-file limit"]
fn running_out_of_descriptors() {
    let port: u16 = std::env::var("FD_LIMIT_TEST_PORT").expect("started by its parent test").parse().unwrap();
    let a = Engine::new(loopback()).unwrap();
    let limit = nofile();
    assert_eq!(limit.rlim_cur, limit.rlim_max, "the engine left the soft limit below the hard one");

    // Leave room for a handful of descriptors beyond what is open now: connections soon run out.
    let open = testkit::cost::descriptors() as libc::rlim_t;
    let low = libc::rlimit { rlim_cur: open + 24, rlim_max: limit.rlim_max };
    // SAFETY: a valid rlimit that outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);

    let mut conns = Vec::new();
    let err = loop {
        assert!(conns.len() < 64, "{} connections within a limit of {} descriptors", conns.len(), low.rlim_cur);
        match a.connect("127.0.0.1", "0", port) {
            Ok(c) => conns.push(c),
            Err(e) => break e,
        }
    };
    let text = err.to_string();
    let named = format!("open-file limit is reached: RLIMIT_NOFILE soft {}", low.rlim_cur);
    assert!(text.contains(&named), "the error does not name the limit: {text}");
    println!("refused after {} connections: {text}", conns.len());
    drop(conns);
    a.shutdown();
}
