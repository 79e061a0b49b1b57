//! Vectors over several regions (`WriteRuns` / `ReadRuns`): one request and one flow for the
//! pieces of many regions, every run authorized against its own region, refused whole, and cut
//! per region.

use super::*;

/// `regions` buffers at each end and, in each, `per` pieces of odd lengths at scattered offsets
/// (the peer's in another order), region-major as a serving stack's block table lists them.
struct Layout {
    local: Vec<Buf>,
    remote: Vec<Buf>,
    per: usize,
}

const LEN: usize = 20_000;
const SLOT: usize = 32 << 10;

impl Layout {
    fn new(a: &End, b: &End, regions: usize, per: usize, local_fill: u8, remote_fill: u8) -> Layout {
        let local = (0..regions).map(|r| a.buffer(per * SLOT, pattern(local_fill + r as u8))).collect();
        let remote = (0..regions).map(|r| b.buffer(per * SLOT, pattern(remote_fill + r as u8))).collect();
        Layout { local, remote, per }
    }

    fn items(&self) -> Vec<(&Buf, usize, &Buf, usize, usize)> {
        let mut out = Vec::new();
        for (l, r) in self.local.iter().zip(&self.remote) {
            for i in 0..self.per {
                let len = LEN - 7 * i;
                out.push((l, i * SLOT + 3, r, (self.per - 1 - i) * SLOT + 11, len));
            }
        }
        out
    }
}

#[test]
fn a_write_over_several_regions_is_one_request_and_one_flow() {
    let (mut a, mut b) = (End::new(), End::new());
    let layout = Layout::new(&a, &b, 5, 7, 10, 0);
    let items = layout.items();
    let total: usize = items.iter().map(|i| i.4).sum();
    let t = a.one_sided_in(true, &items, true);
    let [Control::WriteRuns { runs, segs, .. }] = a.outbox.make_contiguous() else {
        panic!("one request for every region: {:?}", a.outbox.iter().map(Control::kind).collect::<Vec<_>>())
    };
    assert_eq!(runs.len(), 5);
    assert_eq!(segs.len(), 35);
    assert!(runs.iter().zip(&layout.remote).all(|(run, r)| run.region == r.cap.region && run.segs == 7));
    assert_eq!(a.sending.len(), 1, "one flow");
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.receiving.len(), 1, "one flow at the target too");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), total as u64);
    assert!(items_match(&items));
}

#[test]
fn a_read_over_several_regions_is_one_request_and_one_flow_back() {
    let (mut a, mut b) = (End::new(), End::new());
    let layout = Layout::new(&a, &b, 4, 9, 0, 40);
    let items = layout.items();
    let total: usize = items.iter().map(|i| i.4).sum();
    let t = a.one_sided_in(false, &items, true);
    assert!(matches!(a.outbox.make_contiguous(), [Control::ReadRuns { runs, .. }] if runs.len() == 4));
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.make_contiguous(), [Control::Data { len, .. }] if *len == total as u64));
    assert_eq!(b.sending.len(), 1, "one flow");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), total as u64);
    assert!(items_match(&items));
}

#[test]
fn chunks_of_a_flow_over_several_regions_are_cut_as_its_bytes_in_one_region() {
    // Runs of 4 x about 20,000 bytes against chunks of 64 KiB: chunks cross from run to run, as
    // many as the same bytes in one region take (two a run when cut per run).
    let (mut a, mut b) = (End::new(), End::new());
    let layout = Layout::new(&a, &b, 6, 4, 0, 0);
    a.one_sided_in(true, &layout.items(), true);
    let plan = a.sending.values().next().unwrap();
    let regions: Vec<u64> = (1..=6).collect();
    let chunks: Vec<_> = plan::plan(plan.flow, &regions, &plan.extent, a.st.chunking(), plan.seq).collect();
    let size = plan::flow_chunk(plan.extent.len(), a.st.chunking()) as u64;
    assert_eq!(chunks.len() as u64, plan.extent.len().div_ceil(size));
    assert!(chunks.len() < 12, "{} chunks", chunks.len());
    assert_eq!(chunks.len(), chunk_count(&plan.extent, a.st.chunking()));
    assert!(chunks.iter().any(|(_, runs, _)| runs.len() > 1), "some chunk crosses from one run into the next");
    // Each chunk starts in the run the one before ended in, or in the next; the last ends in run 5.
    let mut end = 1;
    for (_, runs, chunk) in &chunks {
        assert!(runs.start == end - 1 || runs.start == end, "{runs:?} after a chunk ending in run {}", end - 1);
        assert_eq!(chunk.region, regions[runs.start]);
        assert_eq!(chunk.regions().map(|(r, _)| r).collect::<Vec<_>>(), regions[runs.clone()]);
        end = runs.end;
    }
    assert_eq!(end, 6);
    assert!(matches!(&plan.region, Some(Regions::Runs(r)) if r.len() == 6));
    pump(&mut a, &mut b);
}

#[test]
fn one_refused_run_refuses_the_whole_vector_and_nothing_lands() {
    for write in [true, false] {
        let (mut a, mut b) = (End::new(), End::new());
        let mut layout = Layout::new(&a, &b, 3, 4, 60, 90);
        // The middle run presents a forged capability of its region.
        layout.remote[1].cap.token ^= 1;
        let before: Vec<Box<[u8]>> = layout.local.iter().chain(&layout.remote).map(|b| b.bytes.clone()).collect();
        let t = a.one_sided_in(write, &layout.items(), true);
        assert!(matches!(a.outbox.front(), Some(Control::WriteRuns { .. } | Control::ReadRuns { .. })));
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "write {write}");
        let after = layout.local.iter().chain(&layout.remote).map(|b| &b.bytes);
        assert!(before.iter().zip(after).all(|(x, y)| x == y), "write {write}: a byte moved");
    }
}

#[test]
fn deregistering_one_region_of_the_flow_fails_it_and_the_others_are_not_cut() {
    for write in [true, false] {
        let (mut a, mut b) = (End::new(), End::new());
        let layout = Layout::new(&a, &b, 3, 4, 1, 2);
        let t = a.one_sided_in(write, &layout.items(), true);
        deliver(&mut a, &mut b).unwrap();
        deliver(&mut b, &mut a).unwrap();
        // The initiator's second region goes while the flow is queued.
        a.cut(&layout.local[1]).unwrap();
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "write {write}");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer(), "write {write}");
    }
}

#[test]
fn without_spans_each_region_is_its_own_request() {
    let (mut a, mut b) = (End::new(), End::new());
    let layout = Layout::new(&a, &b, 3, 4, 5, 0);
    let items = layout.items();
    let t = a.one_sided(true, &items);
    assert_eq!(a.outbox.iter().filter(|m| matches!(m, Control::WriteVector { .. })).count(), 3);
    pump(&mut a, &mut b);
    assert!(a.outcome(&t).unwrap().is_ok());
    assert!(items_match(&items));
}
