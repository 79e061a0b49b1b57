//! The chunk plan: how a flow's bytes are cut into chunks and which channel each chunk rides. Both
//! ends derive it from numbers they share (the flow's length, its segments' lengths, the chunk size,
//! the channel count, the cut and the flow's sequence number in its direction), never from
//! addresses, so per-channel FIFO order is the only matching rule the transport needs.
//!
//! A flow is contiguous memory or a list of segments (a vector: one end's pieces of the same bytes
//! in the same order, each end its own addresses). Its chunk size is [`flow_chunk`]: the agreed
//! chunk size, or for a flow smaller than a chunk per channel a share of it per channel, so a
//! mid-size flow rides every channel instead of one. Chunk `i` covers bytes `[i * chunk, (i + 1) *
//! chunk)` of the flow; with `Cut::Spanning` such a chunk may run over several segments and travels
//! as one vectored request, with `Cut::PerSegment` chunks are cut within each segment instead (for
//! transports that take one buffer per request).
//!
//! A vector over several regions (`WriteRuns` / `ReadRuns`) is one flow whose segments come in
//! runs, one per pair of regions. Spanning chunks cross from one run into the next as they cross
//! segments (protocol 24): a request of 160 regions x 52 blocks is cut as its bytes in one region
//! would be, not into a chunk per region. Such a chunk names the flow's [`Runs`], and the transport
//! gets its segments run by run, each run with its own region's registration.

use std::ops::Range;
use std::sync::Arc;

use crate::transport::IoSeg;

/// The memory a flow moves, on one end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `addr`.
    Contiguous { addr: usize, len: u64 },
    /// The concatenation of `segs`, in order; `len` is their total. No segment is empty.
    /// `runs`: the segment counts of the flow's runs (regions), in order, adding up to the
    /// segments; None is one run.
    Scattered { segs: Arc<[IoSeg]>, len: u64, runs: Option<Arc<[usize]>> },
}

impl Extent {
    /// The segments as one extent. Built straight into its shared allocation (an exact-size
    /// iterator is collected without a growing copy); empty segments, which the protocol and the
    /// API refuse anyway, hold no bytes and get no chunk.
    pub fn scattered(segs: impl IntoIterator<Item = IoSeg>) -> Extent {
        let segs: Arc<[IoSeg]> = segs.into_iter().collect();
        let len = segs.iter().map(|s| s.len as u64).sum();
        Extent::Scattered { segs, len, runs: None }
    }

    /// The segments as one extent of runs of `runs` segments each (which add up to the segments).
    pub fn scattered_runs(segs: impl IntoIterator<Item = IoSeg>, runs: Arc<[usize]>) -> Extent {
        match Extent::scattered(segs) {
            Extent::Scattered { segs, len, .. } => {
                debug_assert_eq!(runs.iter().sum::<usize>(), segs.len());
                let runs = (runs.len() > 1).then_some(runs);
                Extent::Scattered { segs, len, runs }
            }
            contiguous => contiguous,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Extent::Contiguous { len, .. } | Extent::Scattered { len, .. } => *len,
        }
    }
}

/// How the chunks of a scattered flow are cut; both ends of a connection use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Chunks of the full chunk size run over segment boundaries (vectored requests).
    Spanning,
    /// No chunk crosses a segment boundary.
    PerSegment,
}

/// How a connection cuts its flows: the chunk size, channel count and cut both ends agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    /// The largest chunk.
    pub size: usize,
    /// The connection's channels: chunks rotate over them, and small flows are spread over them.
    pub channels: usize,
    pub cut: Cut,
}

/// The smallest chunk a flow is cut into to spread it over the channels (protocol version 12 on).
/// A chunk costs a request on each end and a completion; 128 KiB chunks made 256 KiB transfers
/// slower than one chunk on the 2-core VM, 256 KiB ones did not. The socket transport still shares
/// a 256 KiB chunk over its sockets, so with 64 KiB pieces a flow rides one stream per 64 KiB up
/// to every stream of the connection, as the acknowledged-message baseline does.
pub const MIN_SPREAD_CHUNK: u64 = 256 << 10;
/// Spread chunks are whole pages, so every chunk but a flow's last starts page-aligned when the
/// flow does.
const PAGE: u64 = 4 << 10;

/// The chunk size of a flow of `len` bytes: a page-rounded share per channel, at least
/// [`MIN_SPREAD_CHUNK`], at most the agreed size. A flow of `channels x size` bytes or more takes
/// full chunks; a 1 MiB flow over 4 channels of 2 MiB chunks takes four 256 KiB chunks, one per
/// channel, where one chunk would leave three channels idle.
pub fn flow_chunk(len: u64, chunking: Chunking) -> usize {
    let size = chunking.size as u64;
    let share = len.div_ceil(chunking.channels.max(1) as u64);
    if share >= size {
        return chunking.size;
    }
    share.max(MIN_SPREAD_CHUNK).next_multiple_of(PAGE).min(size) as usize
}

/// Where a chunk's bytes lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkMem {
    /// Contiguous, at this address.
    At(usize),
    /// From `offset` bytes into segment `first` of `segs` on, through as many segments as the
    /// chunk's length reaches. `runs`: the flow's runs, for a chunk that crosses from one into
    /// another (None: every segment is in the chunk's region).
    Spans { segs: Arc<[IoSeg]>, first: usize, offset: usize, runs: Option<Arc<Runs>> },
}

/// The runs of a flow over several regions: the region of each and where its segments start.
#[derive(Debug, PartialEq, Eq)]
pub struct Runs {
    regions: Box<[u64]>,
    /// The first segment of each run.
    starts: Box<[usize]>,
}

impl Runs {
    /// Runs of `counts` segments each, in `regions` (one per run).
    fn new(regions: &[u64], counts: &[usize]) -> Runs {
        let starts = counts.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n))).collect();
        Runs { regions: regions.into(), starts }
    }

    /// The run segment `seg` lies in (a run of no segments holds none).
    fn of(&self, seg: usize) -> usize {
        self.starts.partition_point(|&s| s <= seg).saturating_sub(1)
    }

    /// The first segment of the run after `run`; past the last run, none.
    fn next_start(&self, run: usize) -> usize {
        self.starts.get(run + 1).copied().unwrap_or(usize::MAX)
    }
}

/// The run of each segment of a chunk, its segments looked at in increasing order: the table is
/// searched once for the chunk's first segment and then stepped through. Blocks handed over in an
/// order alternating between regions make runs of one segment; a search per segment put the walk
/// of `Chunk::segments` and `Chunk::regions` at ~4 % of a 98,304-block write's samples.
struct RunWalk<'a> {
    table: Option<&'a Runs>,
    run: usize,
    /// The first segment past the current run.
    next: usize,
}

impl<'a> RunWalk<'a> {
    fn new(table: Option<&'a Runs>, first: usize) -> RunWalk<'a> {
        let run = table.map_or(0, |t| t.of(first));
        RunWalk { table, run, next: table.map_or(usize::MAX, |t| t.next_start(run)) }
    }

    /// The run of segment `seg`, no lower than the one asked for before (as `Runs::of` says).
    fn run_of(&mut self, seg: usize) -> usize {
        if let Some(t) = self.table {
            while seg >= self.next {
                self.run += 1;
                self.next = t.next_start(self.run);
            }
        }
        self.run
    }

    /// The region of the current run (`own`: the chunk's, for a chunk without a table).
    fn region(&self, own: u64) -> u64 {
        self.table.map_or(own, |t| t.regions[self.run])
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flow: u64,
    /// The local region the chunk lies in.
    pub region: u64,
    pub mem: ChunkMem,
    pub len: usize,
}

impl Chunk {
    /// Appends the chunk's memory to `out`, as the segments it covers, and to `runs` the count of
    /// them in each run the chunk touches (one entry for a chunk of one region); a segment that
    /// starts where the one before it in the same run ends is joined to it where `join_touching`
    /// says so of that run's region. A KV cache's consecutive blocks are often side by side, and
    /// every segment of a vectored request costs the transport an iovec, which the kernel's copies
    /// pay for (16 KiB blocks side by side moved at 0.84-0.92 of one piece on 16 cores). Only this
    /// chunk's segments are joined, never across runs (two regions are two allocations, which one
    /// copy must not cross), and not where a region's memory may lie in several device
    /// allocations; the bytes and their order stay the same.
    pub fn segments(&self, out: &mut Vec<IoSeg>, runs: &mut Vec<usize>, join_touching: &dyn Fn(u64) -> bool) {
        match &self.mem {
            ChunkMem::At(addr) => {
                out.push(IoSeg { addr: *addr, len: self.len });
                runs.push(1);
            }
            ChunkMem::Spans { segs, first, offset, runs: table } => {
                // Run by run, one plain loop over each run's segments. The walk through iterator
                // adapters with a run lookup per segment took 27 us a chunk of 4,096 blocks of 512
                // B on an H200 host (sampled), on the thread posting the chunks, which is what bounds
                // such requests; with this loop their data phase went from 4.6-5.4 to 4.4-4.7 ms
                // (three pairs, 2 x H200).
                let mut walk = RunWalk::new(table.as_deref(), *first);
                // Consecutive runs often share this end's region (another region of the peer's):
                // its answer is kept rather than asked again.
                let mut asked: Option<(u64, bool)> = None;
                let (mut at, mut skip, mut left) = (*first, *offset, self.len);
                while left > 0 && at < segs.len() {
                    walk.run_of(at);
                    let end = walk.next.min(segs.len());
                    let region = walk.region(self.region);
                    let join = match asked {
                        Some((r, j)) if r == region => j,
                        _ => join_touching(region),
                    };
                    asked = Some((region, join));
                    let start = out.len();
                    out.reserve(end - at);
                    while left > 0 && at < end {
                        let seg = segs[at];
                        let n = (seg.len - skip).min(left);
                        let piece = IoSeg { addr: seg.addr + skip, len: n };
                        (skip, left, at) = (0, left - n, at + 1);
                        if n == 0 {
                            continue;
                        }
                        match out[start..].last_mut() {
                            Some(last) if join && last.addr.checked_add(last.len) == Some(piece.addr) => last.len += n,
                            _ => out.push(piece),
                        }
                    }
                    if out.len() > start {
                        runs.push(out.len() - start);
                    }
                }
            }
        }
    }

    /// The regions the chunk's bytes lie in, in order, each with the first segment of the chunk
    /// in it: one for a chunk of one region.
    pub fn regions(&self) -> impl Iterator<Item = (u64, IoSeg)> + '_ {
        // A contiguous chunk is its one segment; a spanning one walks its segments.
        let (table, at, walk) = match &self.mem {
            ChunkMem::At(addr) => (None, Some((0, IoSeg { addr: *addr, len: self.len })), spanned(&[], 0, 0, 0)),
            ChunkMem::Spans { segs, first, offset, runs } => {
                (runs.as_ref(), None, spanned(segs, *first, *offset, self.len))
            }
        };
        let mut runs = RunWalk::new(table.map(|t| &**t), self.first_segment());
        let mut last = None;
        at.into_iter().chain(walk).filter_map(move |(i, seg)| {
            let run = runs.run_of(i);
            (last != Some(run)).then(|| {
                last = Some(run);
                (runs.region(self.region), seg)
            })
        })
    }

    /// The index of the chunk's first segment in its flow's (0 for a contiguous chunk).
    fn first_segment(&self) -> usize {
        match &self.mem {
            ChunkMem::At(_) => 0,
            ChunkMem::Spans { first, .. } => *first,
        }
    }

    /// Whether any byte of the chunk lies in `region`.
    pub fn touches(&self, region: u64) -> bool {
        match &self.mem {
            ChunkMem::Spans { runs: Some(_), .. } => self.regions().any(|(r, _)| r == region),
            _ => self.region == region,
        }
    }

    /// The lowest address the chunk touches and the distance to the end of its highest byte.
    /// Walks the segments without collecting them: every chunk of a vector is queued through
    /// here, and a list per chunk cost a 1024-piece write's post a few microseconds.
    pub fn hull(&self) -> (usize, usize) {
        match &self.mem {
            ChunkMem::At(addr) => (*addr, self.len),
            ChunkMem::Spans { segs, first, offset, .. } => {
                let bounds =
                    spanned(segs, *first, *offset, self.len).fold(None, |b: Option<(usize, usize)>, (_, s)| {
                        let (lo, hi) = b.unwrap_or((s.addr, s.addr + s.len));
                        Some((lo.min(s.addr), hi.max(s.addr + s.len)))
                    });
                bounds.map_or((0, 0), |(lo, hi)| (lo, hi - lo))
            }
        }
    }
}

/// The non-empty segments `len` bytes cover from `offset` bytes into `segs[first]` on, each with
/// its index in `segs`.
fn spanned(segs: &[IoSeg], first: usize, offset: usize, len: usize) -> impl Iterator<Item = (usize, IoSeg)> + '_ {
    let (mut left, mut offset) = (len, offset);
    segs[first..]
        .iter()
        .enumerate()
        .map_while(move |(i, seg)| {
            if left == 0 {
                return None;
            }
            let n = (seg.len - offset).min(left);
            let at = IoSeg { addr: seg.addr + offset, len: n };
            left -= n;
            offset = 0;
            Some((first + i, at))
        })
        .filter(|(_, s)| s.len > 0)
}

/// How many chunks the flow over `extent` is cut into.
pub fn chunk_count(extent: &Extent, chunking: Chunking) -> usize {
    let size = flow_chunk(extent.len(), chunking);
    match (extent, chunking.cut) {
        (Extent::Scattered { segs, .. }, Cut::PerSegment) => segs.iter().map(|s| s.len.div_ceil(size)).sum(),
        _ => extent.len().div_ceil(size as u64) as usize,
    }
}

/// Cuts the flow over `extent` into chunks; chunk `i` of the flow with direction sequence number
/// `seq` rides channel `(seq + i) % channels`, so flows of one chunk spread over channels too.
/// Each chunk comes with the runs it lies in; `regions` names the region of each run (one entry:
/// every run's).
pub fn plan<'a>(
    flow: u64,
    regions: &'a [u64],
    extent: &Extent,
    chunking: Chunking,
    seq: u64,
) -> impl Iterator<Item = (usize, Range<usize>, Chunk)> + 'a {
    let channels = chunking.channels.max(1);
    let first_channel = (seq % channels as u64) as usize;
    let size = flow_chunk(extent.len(), chunking);
    // Only a flow of several regions keeps a table of its runs (no allocation for one region).
    let runs = match extent {
        Extent::Scattered { runs: Some(counts), .. } if regions.len() > 1 => {
            debug_assert_eq!(regions.len(), counts.len(), "a region per run");
            (regions.len() == counts.len()).then(|| Arc::new(Runs::new(regions, counts)))
        }
        _ => None,
    };
    let mut cursor = Cursor { extent: extent.clone(), seg: 0, offset: 0, left: extent.len(), runs };
    (0..chunk_count(extent, chunking)).map(move |i| {
        let (runs, mem, len) = cursor.next(size, chunking.cut);
        let region = regions[runs.start.min(regions.len() - 1)];
        ((first_channel + i) % channels, runs, Chunk { flow, region, mem, len })
    })
}

/// Where the next chunk of a flow starts.
struct Cursor {
    extent: Extent,
    /// Scattered: the segment and the offset in it.
    seg: usize,
    offset: usize,
    /// Bytes of the flow not yet in a chunk.
    left: u64,
    runs: Option<Arc<Runs>>,
}

impl Cursor {
    /// The next chunk: the runs it lies in, its memory and its length.
    fn next(&mut self, chunk_size: usize, cut: Cut) -> (Range<usize>, ChunkMem, usize) {
        match &self.extent {
            Extent::Contiguous { addr, len } => {
                let done = (*len - self.left) as usize;
                let n = (self.left as usize).min(chunk_size);
                self.left -= n as u64;
                (0..1, ChunkMem::At(addr + done), n)
            }
            Extent::Scattered { segs, .. } => {
                let segs = segs.clone();
                while segs[self.seg].len == 0 {
                    self.seg += 1;
                }
                let here = segs[self.seg];
                let in_seg = here.len - self.offset;
                let n = match cut {
                    Cut::Spanning => (self.left.min(chunk_size as u64)) as usize,
                    Cut::PerSegment => in_seg.min(chunk_size),
                };
                let (first_seg, offset) = (self.seg, self.offset);
                self.left -= n as u64;
                let mut step = n;
                let mut last_seg = self.seg;
                while step > 0 {
                    let room = segs[self.seg].len - self.offset;
                    last_seg = self.seg;
                    if step < room {
                        self.offset += step;
                        break;
                    }
                    step -= room;
                    self.seg += 1;
                    self.offset = 0;
                }
                let run_of = |seg| self.runs.as_ref().map_or(0, |r| r.of(seg));
                let runs = run_of(first_seg)..run_of(last_seg) + 1;
                let mem = if n <= in_seg {
                    ChunkMem::At(here.addr + offset)
                } else {
                    let table = (runs.len() > 1).then(|| self.runs.clone()).flatten();
                    ChunkMem::Spans { segs, first: first_seg, offset, runs: table }
                };
                (runs, mem, n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Chunk::segments` lists, spelled out: the segments `spanned` yields, each run's looked
    /// up on its own, side by side ones of a run joined where its region says so.
    fn segments_spelled_out(c: &Chunk, out: &mut Vec<IoSeg>, runs: &mut Vec<usize>, joins: &dyn Fn(u64) -> bool) {
        let ChunkMem::Spans { segs, first, offset, runs: table } = &c.mem else { panic!("not a spanning chunk") };
        let mut last_run = None;
        for (i, seg) in spanned(segs, *first, *offset, c.len) {
            let run = table.as_ref().map_or(0, |t| t.of(i));
            let region = table.as_ref().map_or(c.region, |t| t.regions[run]);
            match out.last_mut().filter(|_| last_run == Some(run)) {
                Some(p) if joins(region) && p.addr.checked_add(p.len) == Some(seg.addr) => p.len += seg.len,
                Some(_) => {
                    out.push(seg);
                    *runs.last_mut().expect("a run started") += 1;
                }
                None => {
                    out.push(seg);
                    runs.push(1);
                    last_run = Some(run);
                }
            }
        }
    }

    /// A xorshift generator from `seed`: each call a number below its bound.
    fn xorshift(mut x: u64) -> impl FnMut(usize) -> usize {
        move |bound| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % bound as u64) as usize
        }
    }

    fn seg(addr: usize, len: usize) -> IoSeg {
        IoSeg { addr, len }
    }

    /// The plan of a flow in one region, without the run of each chunk.
    fn plan(
        flow: u64,
        region: u64,
        extent: &Extent,
        chunking: Chunking,
        seq: u64,
    ) -> std::vec::IntoIter<(usize, Chunk)> {
        let chunks: Vec<_> = super::plan(flow, &[region], extent, chunking, seq).map(|(ch, _, c)| (ch, c)).collect();
        chunks.into_iter()
    }

    /// Random flows over random runs, some segments side by side (joinable), cut at random points:
    /// the loop lists what is spelled out naively, into a list already holding some.
    #[test]
    fn a_chunks_segments_are_those_spelled_out_segment_by_segment() {
        let mut rand = xorshift(0x9e37_79b9_7f4a_7c15);
        for case in 0..3000 {
            let count = 1 + rand(40);
            let mut addr = 0x10_0000;
            let segs: Vec<IoSeg> = (0..count)
                .map(|_| {
                    // Side by side with the one before, or apart; now and then empty.
                    addr += if rand(3) == 0 { 0 } else { 64 * (1 + rand(8)) };
                    let len = if rand(17) == 0 { 0 } else { 1 + rand(300) };
                    let s = seg(addr, len);
                    addr += len;
                    s
                })
                .collect();
            let mut counts = Vec::new();
            let mut left = count;
            while left > 0 {
                let n = rand(left + 1).max(usize::from(rand(4) == 0));
                counts.push(n.min(left));
                left -= n.min(left);
                if rand(5) == 0 {
                    counts.push(0);
                }
            }
            let regions: Vec<u64> = (0..counts.len()).map(|r| 10 + (r % 4) as u64).collect();
            let table = (counts.len() > 1 && rand(4) != 0).then(|| Arc::new(Runs::new(&regions, &counts)));
            let total: usize = segs.iter().map(|s| s.len).sum();
            let Some(first) = (0..count).filter(|&i| segs[i].len > 0).nth(rand(count)) else { continue };
            let offset = rand(segs[first].len);
            let after: usize = segs[first..].iter().map(|s| s.len).sum::<usize>() - offset;
            let len = 1 + rand(after.min(total));
            let chunk = Chunk {
                flow: 1,
                region: 10,
                mem: ChunkMem::Spans { segs: segs.clone().into(), first, offset, runs: table },
                len,
            };
            let joins = |r: u64| !r.is_multiple_of(3);
            let prefix = vec![seg(1, 1); rand(3)];
            let (mut want, mut want_runs) = (prefix.clone(), vec![7]);
            segments_spelled_out(&chunk, &mut want, &mut want_runs, &joins);
            let (mut got, mut got_runs) = (prefix, vec![7]);
            chunk.segments(&mut got, &mut got_runs, &joins);
            assert_eq!((got, got_runs), (want, want_runs), "case {case}: {chunk:?}");
        }
    }

    #[test]
    fn a_run_walk_names_the_run_a_search_would_from_any_first_segment() {
        // Runs of 3, 0, 1, 1, 0, 0 and 4 segments: empty runs hold no segment, the last run
        // reaches the end, and runs of one segment come one after the other.
        let counts = [3, 0, 1, 1, 0, 0, 4];
        let table = Runs::new(&[10, 11, 12, 13, 14, 15, 16], &counts);
        let segs: usize = counts.iter().sum();
        for first in 0..segs {
            let mut walk = RunWalk::new(Some(&table), first);
            for seg in first..segs {
                assert_eq!(walk.run_of(seg), table.of(seg), "from {first}, segment {seg}");
                assert_eq!(walk.region(0), table.regions[table.of(seg)]);
            }
        }
        // Without a table every segment is in the chunk's own region.
        let mut walk = RunWalk::new(None, 5);
        assert_eq!((walk.run_of(5), walk.run_of(1000), walk.region(42)), (0, 0, 42));
    }

    #[test]
    fn chunks_cross_runs_as_they_cross_segments_and_both_ends_cut_alike() {
        // Three runs of 16-byte pieces: 5, 2 and 9 pieces, chunks of 48 bytes.
        let runs: Arc<[usize]> = Arc::from([5, 2, 9]);
        let here = Extent::scattered_runs((0..16).map(|i| seg(0x1000 + i * 100, 16)), runs.clone());
        let there = Extent::scattered_runs((0..16).map(|i| seg(0x9000 + (15 - i) * 32, 16)), runs.clone());
        let chunking = Chunking { size: 48, channels: 3, cut: Cut::Spanning };
        let a: Vec<_> = super::plan(4, &[10, 11, 12], &here, chunking, 1).collect();
        let b: Vec<_> = super::plan(4, &[20, 21, 22], &there, chunking, 1).collect();
        let shape = |p: &[(usize, Range<usize>, Chunk)]| {
            p.iter().map(|(ch, runs, c)| (*ch, runs.clone(), c.len)).collect::<Vec<_>>()
        };
        // 256 bytes: five chunks of 48 and one of 16, as in one region; the second chunk holds
        // pieces 3-5 (run 0 and run 1), the third pieces 6-8 (runs 1 and 2).
        let want = [(1, 0..1, 48), (2, 0..2, 48), (0, 1..3, 48), (1, 2..3, 48), (2, 2..3, 48), (0, 2..3, 16)];
        assert_eq!(shape(&a), want);
        assert_eq!(shape(&b), want, "the peer's addresses and regions do not change the cut");
        assert_eq!(chunk_count(&here, chunking), want.len());
        let one_region = Extent::scattered((0..16).map(|i| seg(0x1000 + i * 100, 16)));
        assert_eq!(chunk_count(&one_region, chunking), want.len(), "as many chunks as one region takes");
        assert_eq!(a.iter().map(|(_, _, c)| c.region).collect::<Vec<_>>(), [10, 10, 11, 12, 12, 12]);
        let regions = |c: &Chunk| c.regions().map(|(r, s)| (r, s.addr)).collect::<Vec<_>>();
        assert_eq!(regions(&a[1].2), [(10, 0x1000 + 300), (11, 0x1000 + 500)]);
        assert_eq!(regions(&a[2].2), [(11, 0x1000 + 600), (12, 0x1000 + 700)]);
        assert_eq!(regions(&a[3].2), [(12, 0x1000 + 900)]);
        assert!(a[2].2.touches(11) && a[2].2.touches(12) && !a[2].2.touches(10));
        // Each run's segments apart; pieces side by side are joined only inside a run.
        let side: Vec<IoSeg> = (0..16).map(|i| seg(0x1000 + i * 16, 16)).collect();
        let joined: Vec<_> = super::plan(4, &[10, 11, 12], &Extent::scattered_runs(side, runs), chunking, 1).collect();
        let (mut out, mut counts) = (Vec::new(), Vec::new());
        joined[1].2.segments(&mut out, &mut counts, &|r| r != 12);
        assert_eq!(out, [seg(0x1000 + 48, 32), seg(0x1000 + 80, 16)], "run 0's two pieces joined, run 1 apart");
        assert_eq!(counts, [1, 1]);
        let (mut out, mut counts) = (Vec::new(), Vec::new());
        joined[2].2.segments(&mut out, &mut counts, &|r| r != 12);
        assert_eq!(out, [seg(0x1000 + 96, 16), seg(0x1000 + 112, 16), seg(0x1000 + 128, 16)], "region 12 never joins");
        assert_eq!(counts, [1, 2]);
        let mut covered = Vec::new();
        for (_, _, c) in &a {
            c.segments(&mut covered, &mut Vec::new(), &|_| false);
        }
        let Extent::Scattered { segs, .. } = &here else { unreachable!() };
        assert_eq!(covered, segs.to_vec(), "every byte once, in order");
        // One region for every run (a flow through scratch memory): the same cut, no run table.
        let scratch: Vec<_> = super::plan(4, &[0], &here, chunking, 1).collect();
        assert_eq!(
            scratch.iter().map(|(ch, _, c)| (*ch, c.len)).collect::<Vec<_>>(),
            [(1, 48), (2, 48), (0, 48), (1, 48), (2, 48), (0, 16)]
        );
        assert!(scratch.iter().all(|(_, _, c)| !matches!(c.mem, ChunkMem::Spans { runs: Some(_), .. })));
        // Per-segment cuts: segments never share a chunk; each chunk names its segment's run.
        let per = Chunking { cut: Cut::PerSegment, ..chunking };
        assert_eq!(chunk_count(&here, per), 16);
        let per_runs: Vec<_> = super::plan(4, &[10, 11, 12], &here, per, 0).map(|(_, r, c)| (r, c.region)).collect();
        assert_eq!(per_runs.iter().filter(|(r, c)| *r == (1..2) && *c == 11).count(), 2);
        assert!(matches!(Extent::scattered_runs([seg(1, 2)], Arc::from([1])), Extent::Scattered { runs: None, .. }));
    }

    fn memory(chunks: &[(usize, Chunk)]) -> Vec<IoSeg> {
        let mut out = Vec::new();
        for (_, c) in chunks {
            let before = out.len();
            c.segments(&mut out, &mut Vec::new(), &|_| true);
            assert_eq!(out[before..].iter().map(|s| s.len).sum::<usize>(), c.len, "{c:?}");
        }
        out
    }

    /// Merges touching segments, so two covers of the same bytes compare equal.
    fn merged(segs: Vec<IoSeg>) -> Vec<IoSeg> {
        let mut out: Vec<IoSeg> = Vec::new();
        for s in segs {
            match out.last_mut() {
                Some(last) if last.addr + last.len == s.addr => last.len += s.len,
                _ => out.push(s),
            }
        }
        out
    }

    #[test]
    fn contiguous_plan_covers_every_byte_once_and_rotates() {
        let ext = Extent::Contiguous { addr: 1000, len: 10 };
        let chunks: Vec<_> = plan(9, 3, &ext, Chunking { size: 4, channels: 3, cut: Cut::Spanning }, 1).collect();
        let at = |addr, len| Chunk { flow: 9, region: 3, mem: ChunkMem::At(addr), len };
        assert_eq!(chunks, vec![(1, at(1000, 4)), (2, at(1004, 4)), (0, at(1008, 2))]);
        assert_eq!(chunk_count(&ext, Chunking { size: 4, channels: 3, cut: Cut::PerSegment }), 3);
        assert_eq!(
            chunk_count(&Extent::Contiguous { addr: 0, len: 8 }, Chunking { size: 4, channels: 3, cut: Cut::Spanning }),
            2
        );
        let one: Vec<_> = plan(
            1,
            2,
            &Extent::Contiguous { addr: 0, len: 1 },
            Chunking { size: 4096, channels: 2, cut: Cut::Spanning },
            5,
        )
        .collect();
        assert_eq!(one, vec![(1, Chunk { flow: 1, region: 2, mem: ChunkMem::At(0), len: 1 })]);
    }

    #[test]
    fn spanning_chunks_are_full_size_and_cross_segments() {
        let segs = vec![seg(100, 3), seg(200, 10), seg(400, 1), seg(500, 6)];
        let ext = Extent::scattered(segs.clone());
        assert_eq!(ext.len(), 20);
        let chunks: Vec<_> = plan(1, 1, &ext, Chunking { size: 8, channels: 2, cut: Cut::Spanning }, 0).collect();
        assert_eq!(chunks.iter().map(|(_, c)| c.len).collect::<Vec<_>>(), [8, 8, 4]);
        assert_eq!(chunks.iter().map(|(ch, _)| *ch).collect::<Vec<_>>(), [0, 1, 0]);
        assert_eq!(chunk_count(&ext, Chunking { size: 8, channels: 2, cut: Cut::Spanning }), 3);
        let mut c0 = Vec::new();
        chunks[0].1.segments(&mut c0, &mut Vec::new(), &|_| true);
        assert_eq!(c0, [seg(100, 3), seg(200, 5)]);
        let mut c1 = Vec::new();
        chunks[1].1.segments(&mut c1, &mut Vec::new(), &|_| true);
        assert_eq!(c1, [seg(205, 5), seg(400, 1), seg(500, 2)]);
        assert_eq!(chunks[1].1.hull(), (205, 297));
        // A chunk inside one segment is plain memory.
        assert_eq!(chunks[2].1.mem, ChunkMem::At(502));
        assert_eq!(merged(memory(&chunks)), segs);
    }

    #[test]
    fn a_spanning_chunk_hull_covers_its_segments_in_any_address_order() {
        // Segments out of address order, with empty ones between, the chunk starting mid-segment
        // and ending mid-segment.
        let segs: Arc<[IoSeg]> =
            [seg(5000, 100), seg(0, 0), seg(9000, 50), seg(1000, 30), seg(0, 0), seg(7000, 40)].into();
        let chunk = |first, offset, len| Chunk {
            flow: 1,
            region: 1,
            mem: ChunkMem::Spans { segs: segs.clone(), first, offset, runs: None },
            len,
        };
        let from_segments = |c: &Chunk| {
            let mut out = Vec::new();
            c.segments(&mut out, &mut Vec::new(), &|_| true);
            assert_eq!(out.iter().map(|s| s.len).sum::<usize>(), c.len);
            assert!(out.iter().all(|s| s.len > 0), "{out:?}");
            let lo = out.iter().map(|s| s.addr).min().unwrap();
            (lo, out.iter().map(|s| s.addr + s.len).max().unwrap() - lo)
        };
        for (first, offset, len) in
            [(0, 10, 90), (0, 10, 91), (0, 60, 100), (0, 0, 180), (2, 49, 31), (3, 0, 70), (2, 0, 120)]
        {
            let c = chunk(first, offset, len);
            assert_eq!(c.hull(), from_segments(&c), "first {first} offset {offset} len {len}");
        }
        assert_eq!(chunk(0, 60, 100).hull(), (1000, 9050 - 1000), "5060+40, 9000+50, 1000+10");
        assert_eq!(chunk(3, 0, 70).hull(), (1000, 7040 - 1000));
    }

    #[test]
    fn empty_segments_get_no_chunk() {
        let segs = vec![seg(100, 0), seg(200, 10), seg(300, 0), seg(400, 0), seg(500, 6), seg(600, 0)];
        for cut in [Cut::Spanning, Cut::PerSegment] {
            let ext = Extent::scattered(segs.clone());
            let chunks: Vec<_> = plan(1, 1, &ext, Chunking { size: 4, channels: 2, cut }, 0).collect();
            assert_eq!(chunks.len(), chunk_count(&ext, Chunking { size: 4, channels: 2, cut }), "{cut:?}");
            assert!(chunks.iter().all(|(_, c)| c.len > 0), "{cut:?}");
            assert_eq!(merged(memory(&chunks)), [seg(200, 10), seg(500, 6)], "{cut:?}");
        }
    }

    #[test]
    fn per_segment_chunks_never_cross_a_boundary() {
        let segs = vec![seg(100, 3), seg(200, 10), seg(400, 1), seg(500, 6)];
        let ext = Extent::scattered(segs.clone());
        let chunks: Vec<_> = plan(1, 1, &ext, Chunking { size: 4, channels: 4, cut: Cut::PerSegment }, 3).collect();
        assert_eq!(chunks.iter().map(|(_, c)| c.len).collect::<Vec<_>>(), [3, 4, 4, 2, 1, 4, 2]);
        assert!(chunks.iter().all(|(_, c)| matches!(c.mem, ChunkMem::At(_))));
        assert_eq!(chunk_count(&ext, Chunking { size: 4, channels: 4, cut: Cut::PerSegment }), chunks.len());
        assert_eq!(chunks.iter().map(|(ch, _)| *ch).collect::<Vec<_>>(), [3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(merged(memory(&chunks)), segs);
    }

    /// Both ends cut the same lengths whatever their own segment addresses, for many shapes.
    #[test]
    fn both_ends_derive_the_same_lengths_and_every_byte_is_covered_once() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..300 {
            let n = 1 + next(40);
            let lens: Vec<usize> = (0..n).map(|_| 1 + next(5000)).collect();
            let chunk = 1 + next(9000);
            let layout = |gap: usize| -> Vec<IoSeg> {
                let mut at = 0x10000;
                lens.iter()
                    .map(|&len| {
                        let s = seg(at, len);
                        at += len + gap;
                        s
                    })
                    .collect()
            };
            for cut in [Cut::Spanning, Cut::PerSegment] {
                let (a, b) = (layout(7), layout(4096));
                let pa: Vec<_> =
                    plan(1, 1, &Extent::scattered(a.clone()), Chunking { size: chunk, channels: 3, cut }, 2).collect();
                let pb: Vec<_> =
                    plan(1, 1, &Extent::scattered(b.clone()), Chunking { size: chunk, channels: 3, cut }, 2).collect();
                let shape = |p: &[(usize, Chunk)]| p.iter().map(|(ch, c)| (*ch, c.len)).collect::<Vec<_>>();
                assert_eq!(shape(&pa), shape(&pb), "{lens:?} in chunks of {chunk}");
                assert!(pa.iter().all(|(_, c)| c.len <= chunk && c.len > 0));
                assert_eq!(merged(memory(&pa)), merged(a));
                assert_eq!(merged(memory(&pb)), merged(b));
            }
        }
    }

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;

    fn spread(size: u64, channels: usize, cut: Cut) -> Chunking {
        Chunking { size: size as usize, channels, cut }
    }

    /// The shape both ends agree on: each chunk's channel and length.
    fn shape(extent: &Extent, chunking: Chunking, seq: u64) -> Vec<(usize, usize)> {
        plan(1, 1, extent, chunking, seq).map(|(ch, c)| (ch, c.len)).collect()
    }

    #[test]
    fn mid_size_flows_ride_every_channel() {
        let wide = spread(2 * M, 4, Cut::Spanning);
        let flow = |len| Extent::Contiguous { addr: 1 << 30, len };
        let quarter = (256 * K) as usize;
        // One chunk per channel, starting at the flow's own channel.
        assert_eq!(shape(&flow(M), wide, 1), [(1, quarter), (2, quarter), (3, quarter), (0, quarter)]);
        assert_eq!(shape(&flow(4 * M), wide, 0).iter().map(|&(ch, _)| ch).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(flow_chunk(4 * M, wide), M as usize);
        // Shares are whole pages, at least the minimum; the last chunk takes the rest.
        assert_eq!(flow_chunk(M + 1, wide), (260 * K) as usize);
        assert_eq!(shape(&flow(M + 1), wide, 0).last(), Some(&(3, (M + 1 - 3 * 260 * K) as usize)));
        assert_eq!(flow_chunk(256 * K, wide), MIN_SPREAD_CHUNK as usize);
        assert_eq!(shape(&flow(64 * K + 1), wide, 2), [(2, (64 * K + 1) as usize)]);
        // From a full chunk per channel on, flows keep the agreed size.
        assert_eq!(flow_chunk(8 * M, wide), (2 * M) as usize);
        assert_eq!(flow_chunk(64 * M, wide), (2 * M) as usize);
        assert_eq!(flow_chunk(8 * M - 1, wide), (2 * M) as usize);
        // Two channels of 1 MiB (the small hosts' layout) and a single channel.
        assert_eq!(shape(&flow(M), spread(M, 2, Cut::Spanning), 0), [(0, 512 << 10), (1, 512 << 10)]);
        assert_eq!(shape(&flow(M), spread(2 * M, 1, Cut::Spanning), 0), [(0, M as usize)]);
        // A chunk size below the minimum is never exceeded.
        assert_eq!(flow_chunk(M, spread(64 * K, 4, Cut::Spanning)), (64 * K) as usize);
        assert_eq!(flow_chunk(M, spread(5000, 4, Cut::Spanning)), 5000);
    }

    #[test]
    fn vectors_spread_like_contiguous_flows() {
        let wide = |cut| spread(2 * M, 4, cut);
        // 1 MiB of 16 KiB segments: spanning chunks cross segments and match a contiguous flow's,
        // per-segment chunks stay inside one segment each and so are no larger than it.
        let segs: Vec<IoSeg> = (0..64).map(|i| seg(0x10_0000 + i * 0x8000, 16 << 10)).collect();
        let ext = Extent::scattered(segs.clone());
        let span: Vec<_> = plan(1, 1, &ext, wide(Cut::Spanning), 0).collect();
        let contiguous = shape(&Extent::Contiguous { addr: 0, len: M }, wide(Cut::Spanning), 0);
        assert_eq!(span.iter().map(|(ch, c)| (*ch, c.len)).collect::<Vec<_>>(), contiguous);
        assert_eq!(merged(memory(&span)), segs);
        let per: Vec<_> = plan(1, 1, &ext, wide(Cut::PerSegment), 0).collect();
        assert_eq!(per.len(), 64);
        assert_eq!(per.iter().map(|(ch, _)| *ch).take(5).collect::<Vec<_>>(), [0, 1, 2, 3, 0]);
        assert_eq!(merged(memory(&per)), segs);
        // 2 MiB in four 512 KiB segments: the flow's chunk is 512 KiB, one per segment and channel.
        let big: Vec<IoSeg> = (0..4).map(|i| seg(0x1000_0000 + i * 0x10_0000, 512 << 10)).collect();
        let ext = Extent::scattered(big.clone());
        assert_eq!(flow_chunk(2 * M, wide(Cut::PerSegment)), 512 << 10);
        let per: Vec<_> = plan(1, 1, &ext, wide(Cut::PerSegment), 3).collect();
        let expected = [(3, 512 << 10), (0, 512 << 10), (1, 512 << 10), (2, 512 << 10)];
        assert_eq!(per.iter().map(|(ch, c)| (*ch, c.len)).collect::<Vec<_>>(), expected);
        assert_eq!(merged(memory(&per)), big);
    }

    #[test]
    fn a_chunks_segments_side_by_side_are_joined_in_order() {
        let chunk = |segs: Vec<IoSeg>, first, offset, len| Chunk {
            flow: 1,
            region: 1,
            mem: ChunkMem::Spans { segs: segs.into(), first, offset, runs: None },
            len,
        };
        let side_by_side: Vec<IoSeg> = (0..8).map(|i| seg(0x10_0000 + i * 0x4000, 0x4000)).collect();
        let mut out = vec![seg(0x10_0000 - 0x100, 0x100)];
        // Starts 0x1000 into segment 1 and ends 0x1000 into segment 6: one range, and the segment
        // already in `out` (which this one touches) is left alone.
        chunk(side_by_side.clone(), 1, 0x1000, 5 * 0x4000).segments(&mut out, &mut Vec::new(), &|_| true);
        assert_eq!(out, [seg(0x10_0000 - 0x100, 0x100), seg(0x10_5000, 5 * 0x4000)]);
        // Not asked to join (device memory): every segment as it is.
        let mut out = Vec::new();
        chunk(side_by_side, 1, 0x1000, 5 * 0x4000).segments(&mut out, &mut Vec::new(), &|_| false);
        let expected: Vec<IoSeg> = std::iter::once(seg(0x10_5000, 0x3000))
            .chain((2..6).map(|i| seg(0x10_0000 + i * 0x4000, 0x4000)))
            .chain(std::iter::once(seg(0x11_8000, 0x1000)))
            .collect();
        assert_eq!(out, expected);

        // Gaps, a segment before its predecessor in memory, and a repeat stay apart; runs that
        // touch are joined.
        let mixed = vec![
            seg(0x1000, 0x1000),
            seg(0x2000, 0x1000),
            seg(0x8000, 0x1000),
            seg(0x7000, 0x1000),
            seg(0x7000, 0x1000),
            seg(0x8000, 0x800),
            seg(0x8800, 0x800),
        ];
        let mut out = Vec::new();
        chunk(mixed.clone(), 0, 0, 0x6000).segments(&mut out, &mut Vec::new(), &|_| true);
        assert_eq!(out, [seg(0x1000, 0x2000), seg(0x8000, 0x1000), seg(0x7000, 0x1000), seg(0x7000, 0x2000)]);
        assert_eq!(merged(out), merged(mixed), "the same bytes in the same order");

        // A segment ending at the top of the address space is not joined past it.
        let top = vec![seg(usize::MAX - 0xfff, 0x1000), seg(0, 0x1000)];
        let mut out = Vec::new();
        chunk(top.clone(), 0, 0, 0x2000).segments(&mut out, &mut Vec::new(), &|_| true);
        assert_eq!(out, top);
    }

    use proptest::prelude::*;

    fn runner() -> ProptestConfig {
        ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() }
    }

    proptest! {
        #![proptest_config(runner())]

        /// The flow's chunk size is a function of its length and the layout alone, never larger
        /// than agreed, whole pages unless it is the agreed size, full size once every channel
        /// gets a full chunk, and otherwise never more chunks than channels.
        #[test]
        fn flow_chunk_bounds(len in 1u64..=256 * M, channels in 1usize..=8, size in 4 * K..=4 * M) {
            let chunking = spread(size, channels, Cut::Spanning);
            let c = flow_chunk(len, chunking) as u64;
            prop_assert!(c > 0 && c <= size);
            prop_assert!(c == size || c.is_multiple_of(PAGE));
            prop_assert!(c >= MIN_SPREAD_CHUNK.min(size));
            if len >= channels as u64 * size {
                prop_assert_eq!(c, size);
            }
            if c < size {
                prop_assert!(len.div_ceil(c) <= channels as u64);
            }
            prop_assert_eq!(chunk_count(&Extent::Contiguous { addr: 0, len }, chunking) as u64, len.div_ceil(c));
        }

        /// Two ends with different segment layouts of the same lengths cut the same chunks on the
        /// same channels, and each covers its own memory exactly once, at sizes where spreading
        /// applies.
        #[test]
        fn both_ends_agree_on_spread_vectors(
            lens in proptest::collection::vec(1usize..=(512 << 10), 1..24),
            channels in 1usize..=8,
            size in prop_oneof![Just(M), Just(2 * M), Just(4 * M), 4 * K..=4 * M],
            seq in 0u64..16,
        ) {
            let layout = |gap: usize| -> Vec<IoSeg> {
                let mut at = 0x10000;
                lens.iter().map(|&len| { let s = seg(at, len); at += len + gap; s }).collect()
            };
            let total: u64 = lens.iter().map(|&l| l as u64).sum();
            for cut in [Cut::Spanning, Cut::PerSegment] {
                let chunking = spread(size, channels, cut);
                let (a, b) = (Extent::scattered(layout(3)), Extent::scattered(layout(1 << 20)));
                let pa: Vec<_> = plan(1, 1, &a, chunking, seq).collect();
                let pb: Vec<_> = plan(1, 1, &b, chunking, seq).collect();
                let sa: Vec<_> = pa.iter().map(|(ch, c)| (*ch, c.len)).collect();
                prop_assert_eq!(&sa, &pb.iter().map(|(ch, c)| (*ch, c.len)).collect::<Vec<_>>());
                prop_assert_eq!(pa.len(), chunk_count(&a, chunking));
                let c = flow_chunk(total, chunking);
                prop_assert!(pa.iter().all(|(ch, k)| k.len > 0 && k.len <= c && *ch < channels));
                prop_assert!(pa.iter().enumerate().all(|(i, (ch, _))| *ch == (seq as usize + i) % channels));
                prop_assert_eq!(merged(memory(&pa)), merged(layout(3)));
                prop_assert_eq!(merged(memory(&pb)), merged(layout(1 << 20)));
                if cut == Cut::PerSegment {
                    prop_assert!(pa.iter().all(|(_, k)| matches!(k.mem, ChunkMem::At(_))));
                }
            }
        }
    }
}
