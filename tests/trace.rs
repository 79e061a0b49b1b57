//! The trace (`UCCL_TCPX_TRACE`, docs/TRACE.md) of real loopback transfers over the socket engine:
//! one file per process holding the events of the categories asked for, nothing when off, and
//! the scripts of `scripts/diag/` reading what it recorded.

use std::collections::HashMap;

use uccl_tcpx::{Config, Engine, OneSided, SocketConfig, TraceSetting};

mod common;
use common::trace::{Row, files, fresh_dir, rows, run_script};
use common::{pattern, wait};

/// Writes and reads each way per run.
const ROUNDS: usize = 8;
const LEN: usize = 256 << 10;
/// Data sockets per comm, all opened at once.
const SOCKETS: u64 = 2;

/// Runs the traced process with `UCCL_TCPX_TRACE=<setting>` (none: unset) and returns its output.
fn run_traced(setting: Option<String>) -> String {
    let mut child = common::ChildTest::new("traced_transfers_process").ignored();
    if let Some(setting) = setting {
        child = child.env("UCCL_TCPX_TRACE", setting);
    }
    child.run_within(common::TRANSFER_LIMIT)
}

/// Under `UCCL_TCPX_TRACE=<prefix>` the process writes one file of every category's events at
/// exit. Both ends initiate writes and reads on one connection, so each end's flow numbers repeat
/// the other's: only the initiating end keeps the pairs apart, and the flow script must join every
/// transfer's two ends. Every piece a socket sent, its peer socket landed, in order on the one
/// clock; the socket scripts pair the comms and measure the balance the events show.
#[test]
fn a_trace_keeps_every_event_and_the_scripts_read_it() {
    let dir = fresh_dir("all");
    let prefix = dir.join("t").to_string_lossy().into_owned();
    let out = run_traced(Some(prefix.clone()));
    let files = files(&dir);
    assert_eq!(files.len(), 1, "one file for the one process: {files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("t.") && name.ends_with(".tsv"), "{name}");
    let line = out.lines().find(|l| l.starts_with("trace[")).unwrap_or_else(|| panic!("no trace line:\n{out}"));
    assert!(line.contains("events (0 older ones let go) in"), "{line}");
    let rows = rows(&files[0]);
    assert!(rows.windows(2).all(|w| w[0].ns <= w[1].ns), "rows by time");
    check_flows(&rows);
    check_sockets(&rows);

    let report = run_script("flow_timeline.py", &[&prefix]);
    let writes = format!("write {LEN} B: {} joined (0 unmatched); end-to-end p50", 2 * ROUNDS);
    let reads = format!("read {LEN} B: {} joined (0 unmatched); end-to-end p50", 2 * ROUNDS);
    // Steps are listed by their median offset, which a loaded host can reorder (the target read a
    // request before its writer, descheduled, recorded the write): a leg from the post, whichever
    // step follows it, and every step by name.
    for expected in [&writes, &reads, "i.post > ", "i.request_sent", "t.request_read", "t.reply_sent", "i.complete"] {
        assert!(report.contains(expected), "{expected:?} missing:\n{report}");
    }
    assert!(report.contains("replies read by"), "{report}");
    assert!(report.contains("write inline (any size): 1 joined (0 unmatched)"), "{report}");
    // With --first, each group's earliest transfers one by one: as many as there are, at most N,
    // each with its end-to-end time and the legs from its post.
    let firsts = run_script("flow_timeline.py", &[&prefix, "--first", "3"]);
    // Its legs in the order they happened: on a loaded host the target may mark a step first.
    let listed =
        |line: &str| line.trim_start().starts_with("transfer ") && line.contains(" us: ") && line.contains(" +");
    let per_group: Vec<usize> =
        firsts.split("end-to-end p50").skip(1).map(|group| group.lines().filter(|l| listed(l)).count()).collect();
    assert_eq!(per_group, vec![3, 1, 3], "transfers listed per group (read, inline write, write):\n{firsts}");
    assert!(firsts.contains("  transfer 1: ") && firsts.contains("i.request_sent +"), "{firsts}");

    let report = run_script("socket_timeline.py", &[&prefix]);
    assert!(report.contains("comms paired by comm id") && !report.contains("without their peer"), "{report}");
    assert!(report.contains("== all sizes:") && report.contains("end to end"), "{report}");

    let p50 = balance_p50(&rows);
    let report = run_script("socket_balance.py", &[&prefix, "1", &SOCKETS.to_string()]);
    assert!(report.contains(" runs of 1 requests"), "{report}");
    let line = report.lines().find(|l| l.trim_start().starts_with("max/mean")).expect("a max/mean line");
    assert!(line.contains(&format!("p50 {p50:.2}")), "p50 {p50:.2} in {line:?}");

    // Host memory passes the staging decorator untouched: its chunks are traced, none staged; no
    // same-host copy ran.
    let summary = run_script("trace_summary.py", &[&prefix]);
    assert!(summary.contains(" staged); us p50 (min-max) ") && summary.contains("handed>inner_done"), "{summary}");
    let groups: Vec<&str> = summary.lines().filter(|l| l.contains(" group ")).collect();
    assert!(!groups.is_empty() && groups.iter().all(|l| l.contains(", 0 staged)")), "{summary}");
    assert!(!summary.contains("device[") && !summary.contains("host["), "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every write and read over the channels left its request, the flows of both ends, and its
/// outcome; the inline write of 4 KiB left its request, written inline and read so by its target,
/// and no flow.
fn check_flows(rows: &[Row]) {
    let of = |event: &'static str| rows.iter().filter(move |r| r.event == event);
    let msg = |event: &'static str, conn: u64, side: u64, id: u64, kind: u64| {
        of(event).find(move |m| (m.get("conn"), m.get("side"), m.get("id"), m.get("kind")) == (conn, side, id, kind))
    };
    // Kinds of flow messages (`MsgKind`): 5 is an inline write.
    let inline: Vec<&Row> = of("flow_request")
        .filter(|r| msg("flow_msg_out", r.get("conn"), r.get("side"), r.get("xfer"), 5).is_some())
        .collect();
    assert_eq!(inline.len(), 1, "the one inline write's request: {inline:?}");
    let (conn, side, xfer) = (inline[0].get("conn"), inline[0].get("side"), inline[0].get("xfer"));
    assert_eq!(inline[0].get("write"), 1);
    assert!(msg("flow_msg_in", conn, 1 - side, xfer, 5).is_some(), "its target read it inline");
    assert!(msg("flow_msg_in", conn, side, xfer, 3).is_some(), "and its Done came back");
    let planned = |p: &&Row| (p.get("conn"), p.get("side"), p.get("xfer"), p.get("ours")) == (conn, side, xfer, 1);
    assert!(!of("flow_plan").any(|p| planned(&p)), "it planned no flow");
    let requests: Vec<&Row> =
        of("flow_request").filter(|r| (r.get("conn"), r.get("side"), r.get("xfer")) != (conn, side, xfer)).collect();
    let writes = requests.iter().filter(|r| r.get("write") == 1).count();
    assert_eq!((writes, requests.len() - writes), (2 * ROUNDS, 2 * ROUNDS), "requests by kind");
    for r in &requests {
        let (conn, side, xfer) = (r.get("conn"), r.get("side"), r.get("xfer"));
        let plan = |ours: u64, side: u64| {
            of("flow_plan")
                .find(|p| (p.get("conn"), p.get("side"), p.get("xfer"), p.get("ours")) == (conn, side, xfer, ours))
        };
        let ours = plan(1, side).unwrap_or_else(|| panic!("no flow of our request {r:?}"));
        let theirs = plan(0, 1 - side).unwrap_or_else(|| panic!("no flow of the target's for {r:?}"));
        assert_eq!(ours.get("seq"), theirs.get("seq"), "both ends number the flow alike");
        assert_eq!((ours.get("bytes"), theirs.get("bytes")), (LEN as u64, LEN as u64));
        assert_eq!(ours.get("recv"), 1 - r.get("write"), "a read's initiator receives");
        assert_eq!(theirs.get("recv"), r.get("write"), "a write's target receives");
        let call = of("flow_call")
            .find(|c| (c.get("conn"), c.get("side"), c.get("transfer")) == (conn, side, r.get("transfer")))
            .expect("the call of every request");
        let sent = of("flow_msg_out")
            .find(|m| (m.get("conn"), m.get("side"), m.get("id")) == (conn, side, xfer) && m.get("kind") <= 2)
            .expect("every request was written");
        let read = of("flow_msg_in")
            .find(|m| (m.get("conn"), m.get("side"), m.get("id")) == (conn, 1 - side, xfer) && m.get("kind") <= 2)
            .expect("every request was read by its target");
        let done = of("call_done")
            .find(|c| (c.get("conn"), c.get("side"), c.get("transfer")) == (conn, side, r.get("transfer")))
            .expect("every transfer's outcome was handed to its caller");
        // The message is marked once the writer took it, which a quick peer may read before.
        assert!(call.get("entered") <= r.ns && r.ns <= sent.ns, "post, request, written: {call:?} {r:?} {sent:?}");
        assert!(call.get("entered") <= read.ns && read.ns <= done.ns, "posted, read, done: {read:?} {done:?}");
        assert!(read.get("arrived") <= read.ns, "a message is handled after it was read");
    }
}

/// Every piece a socket sent landed on its peer socket whole, taken before its header was read,
/// admitted after, landed last. Every socket a comm added was filed by the receiving side, taken,
/// and opened at the sender, in that order.
fn check_sockets(rows: &[Row]) {
    type Key = (u64, u64, u64);
    let key = |r: &Row| (r.get("comm"), r.get("seq"), r.get("socket"));
    let mut first: HashMap<(&str, Key), u64> = HashMap::new();
    let mut bytes: HashMap<(bool, Key), u64> = HashMap::new();
    let mut last: HashMap<Key, u64> = HashMap::new();
    // (comm, socket) -> each join step: (event, time, taken).
    type Steps<'a> = Vec<(&'a str, u64, u64)>;
    let mut joins: HashMap<(u64, u64), Steps> = HashMap::new();
    for r in rows.iter().filter(|r| matches!(r.event.as_str(), "sock_dial" | "sock_filed" | "sock_opened")) {
        let taken = if r.event == "sock_filed" { r.get("taken") } else { 1 };
        joins.entry((r.get("comm"), r.get("socket"))).or_default().push((r.event.as_str(), r.ns, taken));
    }
    assert!(!joins.is_empty(), "the comms added sockets");
    for (k, steps) in &joins {
        let names: Vec<(&str, u64)> = steps.iter().map(|&(e, _, taken)| (e, taken)).collect();
        assert_eq!(names, [("sock_dial", 1), ("sock_filed", 1), ("sock_opened", 1)], "{k:?}: {steps:?}");
    }
    let pieces = ["sock_take", "sock_sent", "sock_header", "sock_admit", "sock_landed"];
    for r in rows.iter().filter(|r| pieces.contains(&r.event.as_str())) {
        first.entry((r.event.as_str(), key(r))).or_insert(r.ns);
        match r.event.as_str() {
            "sock_sent" => *bytes.entry((true, key(r))).or_default() += r.get("bytes"),
            "sock_landed" => {
                *bytes.entry((false, key(r))).or_default() += r.get("bytes");
                last.insert(key(r), r.ns);
            }
            _ => {}
        }
    }
    let sent: Vec<Key> = bytes.keys().filter(|(send, _)| *send).map(|(_, k)| *k).collect();
    assert!(sent.len() >= 4 * ROUNDS, "pieces of every transfer: {}", sent.len());
    assert_eq!(sent.len() * 2, bytes.len(), "every (comm, request, socket) sent has its landing");
    for k in sent {
        assert_eq!(bytes[&(true, k)], bytes.get(&(false, k)).copied().unwrap_or(0), "{k:?}: bytes agree");
        let at = |event: &str| first.get(&(event, k)).copied().unwrap_or_else(|| panic!("{k:?}: no {event}"));
        let (take, header, admit) = (at("sock_take"), at("sock_header"), at("sock_admit"));
        assert!(take <= header && header <= admit && admit <= last[&k], "{k:?}: out of order");
    }
}

/// What `socket_balance.py PREFIX 1 S` reports as the median max/mean: over the comms that carried
/// the largest requests, each request's busiest socket over the mean of the comm's sockets.
fn balance_p50(rows: &[Row]) -> f64 {
    let mut per_request: HashMap<(u64, u64), HashMap<u64, u64>> = HashMap::new();
    for r in rows.iter().filter(|r| r.event == "sock_sent") {
        *per_request.entry((r.get("comm"), r.get("seq"))).or_default().entry(r.get("socket")).or_default() +=
            r.get("bytes");
    }
    let total = |s: &HashMap<u64, u64>| s.values().sum::<u64>();
    let largest = per_request.values().map(total).max().expect("socket sends");
    let mut ratios: Vec<f64> = per_request
        .values()
        .filter(|s| total(s) == largest)
        .map(|s| *s.values().max().unwrap() as f64 / (largest as f64 / SOCKETS as f64))
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// `UCCL_TCPX_TRACE=socket:<prefix>` keeps the socket events alone.
#[test]
fn only_the_categories_named_are_kept() {
    let dir = fresh_dir("socket");
    run_traced(Some(format!("socket:{}", dir.join("t").display())));
    let files = files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let rows = rows(&files[0]);
    assert!(!rows.is_empty() && rows.iter().all(|r| r.event.starts_with("sock_")), "only socket events");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Off, nothing is recorded and no file written.
#[test]
fn off_nothing_is_written() {
    let out = run_traced(None);
    assert!(!out.contains("trace["), "{out}");
}

#[test]
#[ignore = "runs in a process of its own for the trace tests"]
fn traced_transfers_process() {
    assert!(common::is_child("traced_transfers_process"), "runs as a child of a trace test");
    let trace = std::env::var("UCCL_TCPX_TRACE").ok().map(|v| TraceSetting::parse(&v).unwrap());
    let socket = SocketConfig { nthreads: SOCKETS as u8, lazy: false, ..SocketConfig::default() };
    let config = Config { num_channels: Some(3), chunk_size: 64 << 10, trace, socket, ..common::loopback() };
    let p = common::pair(config);
    // Each engine writes its source into the other's target and reads that target back.
    let mut a_src = pattern(LEN, 3);
    let mut b_src = pattern(LEN, 5);
    let (mut a_dst, mut b_dst) = (vec![0u8; LEN], vec![0u8; LEN]);
    let (mut a_back, mut b_back) = (vec![0u8; LEN], vec![0u8; LEN]);
    let reg = |e: &Engine, buf: &mut Vec<u8>| e.register(buf.as_mut_ptr() as usize, LEN).unwrap();
    let (a_src_mr, a_dst_mr, a_back_mr) = (reg(&p.a, &mut a_src), reg(&p.a, &mut a_dst), reg(&p.a, &mut a_back));
    let (b_src_mr, b_dst_mr, b_back_mr) = (reg(&p.b, &mut b_src), reg(&p.b, &mut b_dst), reg(&p.b, &mut b_back));
    let to_b = p.b.prepare_fifo(b_dst_mr, b_dst.as_ptr() as usize, LEN).unwrap();
    let to_a = p.a.prepare_fifo(a_dst_mr, a_dst.as_ptr() as usize, LEN).unwrap();
    let a_write = |n: usize| OneSided { mr: a_src_mr, addr: a_src.as_ptr() as usize, len: n, remote: to_b };
    let b_write = OneSided { mr: b_src_mr, addr: b_src.as_ptr() as usize, len: LEN, remote: to_a };
    let a_read = OneSided { mr: a_back_mr, addr: a_back.as_mut_ptr() as usize, len: LEN, remote: to_b };
    let b_read = OneSided { mr: b_back_mr, addr: b_back.as_mut_ptr() as usize, len: LEN, remote: to_a };
    for _ in 0..ROUNDS {
        let r = p.ab.read(std::slice::from_ref(&a_read)).unwrap();
        assert_eq!(p.ab.wait(r).unwrap(), LEN as u64);
        let r = p.ba.read(std::slice::from_ref(&b_read)).unwrap();
        assert_eq!(p.ba.wait(r).unwrap(), LEN as u64);
        let w = p.ab.write(&[a_write(LEN)]).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), LEN as u64);
        let w = p.ba.write(std::slice::from_ref(&b_write)).unwrap();
        assert_eq!(wait(&p.ba, w).unwrap(), LEN as u64);
    }
    let small = p.ab.write(&[a_write(4096)]).unwrap();
    assert_eq!(p.ab.wait(small).unwrap(), 4096);
    assert_eq!(b_dst, pattern(LEN, 3));
    assert_eq!(a_dst, pattern(LEN, 5));
    assert_eq!(a_back, pattern(LEN, 3), "the last read brought the written bytes back");
    assert_eq!(b_back, pattern(LEN, 5), "the last read brought the written bytes back");
}

/// Writes, then reads, over the channels that `sliced_waits_process` waits for in slices.
const SLICED_WRITES: usize = 24;

/// A caller waiting in slices (`wait_within`, as the Python package's blocking calls and
/// `uccl_tcpx_wait` with a timeout wait) reads its write's answer, the peer's Done, itself within
/// its slice, instead of sleeping until a control reactor reads it and wakes it: the trace names
/// the thread that read each Done, and the caller's reads some (it cannot read one that came
/// before it waited, nor one while the reactor held the stream). A read, which ends on its own
/// chunks, is finished the same way: the caller, woken by the chunks' completions, tests them
/// itself within its slice, and the trace names it for some of the reads' chunks.
#[test]
fn a_caller_waiting_in_slices_reads_its_answer_itself() {
    let dir = fresh_dir("slices");
    let prefix = dir.join("t").to_string_lossy().into_owned();
    let out = common::ChildTest::new("sliced_waits_process")
        .ignored()
        .env("UCCL_TCPX_TRACE", format!("flow:{prefix}"))
        .run_within(common::TRANSFER_LIMIT);
    let caller: u64 = out
        .lines()
        .find_map(|l| l.split("caller thread ").nth(1))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("the child named no caller thread:\n{out}"));
    let files = files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let rows = rows(&files[0]);
    // Control messages in at the connector's end (side 1) of kind 3: the Dones of its writes.
    let dones: Vec<&Row> =
        rows.iter().filter(|r| r.event == "flow_msg_in" && r.get("side") == 1 && r.get("kind") == 3).collect();
    assert_eq!(dones.len(), SLICED_WRITES, "a Done for every write");
    let by_caller = dones.iter().filter(|r| r.tid == caller).count();
    assert!(by_caller > 0, "the waiting caller read none of the {} Dones", dones.len());
    // The flows the connector's end receives: its reads'.
    let read_flows: Vec<u64> = rows
        .iter()
        .filter(|r| r.event == "flow_plan" && r.get("side") == 1 && r.get("ours") == 1 && r.get("recv") == 1)
        .map(|r| r.get("flow"))
        .collect();
    assert_eq!(read_flows.len(), SLICED_WRITES, "a flow for every read");
    let read_chunks: Vec<&Row> = rows
        .iter()
        .filter(|r| r.event == "flow_chunk_done" && r.get("side") == 1 && read_flows.contains(&r.get("flow")))
        .collect();
    assert!(read_chunks.len() >= SLICED_WRITES, "{} chunks done for {SLICED_WRITES} reads", read_chunks.len());
    let by_caller = read_chunks.iter().filter(|r| r.tid == caller).count();
    assert!(by_caller > 0, "the waiting caller finished none of the reads' {} chunks", read_chunks.len());
}

#[test]
#[ignore = "child process of a_caller_waiting_in_slices_reads_its_answer_itself"]
fn sliced_waits_process() {
    assert!(common::is_child("sliced_waits_process"), "runs as a child of a trace test");
    let trace = std::env::var("UCCL_TCPX_TRACE").ok().map(|v| TraceSetting::parse(&v).unwrap());
    let config =
        Config { num_channels: Some(2), chunk_size: 256 << 10, caller_completes: true, trace, ..common::loopback() };
    let p = common::pair(config);
    let len = 4 << 20;
    let src = pattern(len, 9);
    let mut dst = vec![0u8; len];
    let smr = p.a.register(src.as_ptr() as usize, len).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = p.b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let op = [OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }];
    for _ in 0..SLICED_WRITES {
        let id = p.ab.write(&op).unwrap();
        let deadline = std::time::Instant::now() + common::TRANSFER_LIMIT;
        let got = loop {
            if let Some(n) = p.ab.wait_within(id, std::time::Duration::from_millis(50)).unwrap() {
                break n;
            }
            assert!(std::time::Instant::now() < deadline, "write {id} still in progress");
        };
        assert_eq!(got, len as u64);
    }
    assert!(dst == src, "the written bytes");
    let mut back = vec![0u8; len];
    let bmr = p.a.register(back.as_mut_ptr() as usize, len).unwrap();
    let read = [OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote }];
    for _ in 0..SLICED_WRITES {
        let id = p.ab.read(&read).unwrap();
        let deadline = std::time::Instant::now() + common::TRANSFER_LIMIT;
        while p.ab.wait_within(id, std::time::Duration::from_millis(50)).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "read {id} still in progress");
        }
    }
    assert!(back == src, "the read bytes");
    // SAFETY: gettid takes no arguments and cannot fail.
    println!("caller thread {}", unsafe { libc::syscall(libc::SYS_gettid) });
}
