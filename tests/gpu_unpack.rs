//! The unpack kernel against a CPU gather, byte for byte, on random data and fragment patterns.
//! Every destination lives inside a larger region pre-filled with a guard pattern, and the whole
//! region is compared, so a byte written outside a destination fails the test as surely as a
//! wrong byte inside one. Needs a CUDA driver and NVRTC; elsewhere each test prints SKIPPED.

mod common;

use std::sync::Arc;

use common::Rng;
use cudarc::driver::{CudaContext, result, sys};
use uccl_tcpx::internal::cuda::unpack::{
    BulkTiles, Completion, CompletionCounts, INLINE_SMALL, ReceiveLayout, Submit, Unpacker, UnpackerConfig,
};
use uccl_tcpx::internal::ncclnet::LoadMeta;

const GUARD: u8 = 0xA5;

fn gpu() -> Option<Arc<CudaContext>> {
    if common::gpu::no_gpu() {
        return None;
    }
    let ctx = CudaContext::new(0).expect("primary context of device 0");
    ctx.bind_to_thread().expect("bind context");
    Some(ctx)
}

/// Device memory with a host mirror of what it should hold.
struct Region {
    ptr: sys::CUdeviceptr,
    expected: Vec<u8>,
}

impl Region {
    fn new(bytes: Vec<u8>) -> Region {
        // SAFETY: cuMemAlloc only allocates; every test binds the device's primary context (gpu()) before
        // making a Region.
        let ptr = unsafe { result::malloc_sync(bytes.len()) }.expect("cuMemAlloc");
        // SAFETY: ptr was just allocated with bytes.len() bytes.
        unsafe { result::memcpy_htod_sync(ptr, &bytes) }.expect("upload");
        Region { ptr, expected: bytes }
    }

    fn guarded(len: usize) -> Region {
        Region::new(vec![GUARD; len])
    }

    fn assert_matches(&self, what: &str) {
        let mut actual = vec![0u8; self.expected.len()];
        // SAFETY: actual has expected.len() bytes, the size ptr was allocated with.
        unsafe { result::memcpy_dtoh_sync(&mut actual, self.ptr) }.expect("download");
        if let Some(at) = actual.iter().zip(&self.expected).position(|(a, e)| a != e) {
            let end = (at + 16).min(actual.len());
            panic!(
                "{what}: first difference at byte {at} of {}: got {:02x?}, expected {:02x?}",
                actual.len(),
                &actual[at..end],
                &self.expected[at..end]
            );
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc in new() and is freed once, here; every test waits for its
        // unpacker's launches on a Region (finish, or polling until none is in flight) before dropping it.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// One receive: its destination offset inside the destination region, its length, its fragments.
struct Receive {
    dst_at: usize,
    dst_len: usize,
    metas: Vec<LoadMeta>,
}

/// Applies a receive to the host mirror exactly as the GPU should.
fn cpu_gather(pool: &[u8], dst: &mut [u8], r: &Receive) {
    for m in &r.metas {
        let (s, d, n) = (m.src_off as usize, r.dst_at + m.dst_off as usize, m.len as usize);
        dst[d..d + n].copy_from_slice(&pool[s..s + n]);
    }
}

/// A guarded destination of `len` bytes whose mirror holds what `receives` should leave in it.
fn gathered(pool: &Region, len: usize, receives: &[Receive]) -> Region {
    let mut dst = Region::guarded(len);
    for r in receives {
        cpu_gather(&pool.expected, &mut dst.expected, r);
    }
    dst
}

/// A receive into `[dst_at, dst_at + dst_len)` of `dst`, its fragments read from `pool`.
fn receive_layout(pool: &Region, dst: &Region, dst_at: usize, dst_len: usize) -> ReceiveLayout {
    ReceiveLayout {
        pool: pool.ptr,
        pool_len: pool.expected.len() as u64,
        dst: dst.ptr + dst_at as u64,
        dst_len: dst_len as u64,
    }
}

fn with_events(config: UnpackerConfig) -> UnpackerConfig {
    UnpackerConfig { completion: Completion::Event, ..config }
}

/// Every way tiles reach the kernel: in the parameters (up to the largest variant), copied to
/// device memory, or read through the host mapping; launches report through completion words (the
/// default) except in the last row, which uses events.
fn tile_paths() -> [UnpackerConfig; 4] {
    let base = UnpackerConfig::default();
    [
        UnpackerConfig { inline_tiles: usize::MAX, ..base },
        UnpackerConfig { inline_tiles: 0, bulk: BulkTiles::Copy, ..base },
        UnpackerConfig { inline_tiles: 0, bulk: BulkTiles::Mapped, ..base },
        with_events(UnpackerConfig { inline_tiles: 0, bulk: BulkTiles::Mapped, ..base }),
    ]
}

/// Every launch retired must have been seen through its own signal (word or event), never by the
/// stream-idle fallback, which would hide a kernel that forgot to write its word.
fn assert_signalled(unpacker: &Unpacker, launches: u64) {
    assert_eq!(
        unpacker.completion_counts(),
        CompletionCounts { signalled: launches, by_stream_check: 0 },
        "{:?} completion",
        unpacker.completion()
    );
}

/// Submits every receive (polling when the ring is full), finishes, and checks tickets.
fn run(unpacker: &mut Unpacker, pool: &Region, dst: &Region, receives: &[Receive]) {
    let first = unpacker.submitted();
    for (i, r) in receives.iter().enumerate() {
        let layout = receive_layout(pool, dst, r.dst_at, r.dst_len);
        loop {
            // SAFETY: both regions outlive the unpacker's work (finish below).
            match unsafe { unpacker.submit(&layout, &r.metas) }.expect("submit") {
                Submit::Queued(ticket) => {
                    assert_eq!(ticket, first + i as u64, "tickets are consecutive");
                    break;
                }
                Submit::Full => {
                    let done = unpacker.poll().expect("poll");
                    assert!(done <= first + i as u64, "a receive not yet submitted reported done");
                    std::thread::yield_now();
                }
            }
        }
        let done = unpacker.poll().expect("poll");
        assert!(done <= unpacker.submitted());
    }
    let done = unpacker.finish().expect("finish");
    assert_eq!(done, first + receives.len() as u64, "finish covers every receive");
    assert_eq!(unpacker.pending_receives(), 0);
    assert_eq!(unpacker.launches_in_flight(), 0);
    assert_eq!(unpacker.completion_counts().by_stream_check, 0, "a launch's completion word never arrived");
    assert!(unpacker.completion_counts().signalled > 0);
}

/// Runs `receives` on every tile path, each time into a fresh guarded destination of `dst_len`
/// bytes, and compares the whole destination with a CPU gather.
fn matches_cpu_gather_on_every_tile_path(pool: &Region, receives: &[Receive], dst_len: usize, what: &str) {
    for config in tile_paths() {
        let dst = gathered(pool, dst_len, receives);
        let mut unpacker = Unpacker::new(config).expect("unpacker");
        run(&mut unpacker, pool, &dst, receives);
        dst.assert_matches(&format!("{what}, {config:?}"));
    }
}

/// Fragments covering `dst_len` bytes in order, each from a random place in the pool, with a kind
/// chosen per receive: whole shuffled pages, partial pages, tiny pieces, or runs that continue the
/// previous fragment's source (so they merge). Arrival order is shuffled for half the receives.
fn random_receive(rng: &mut Rng, pool_len: usize, dst_at: usize, dst_len: usize) -> Receive {
    let kind = rng.below(4);
    let pages = pool_len / 4096;
    let mut metas = Vec::new();
    let mut at = 0usize;
    while at < dst_len {
        let want = match kind {
            0 => 4096,
            1 => 1 + rng.below(4096),
            2 => 1 + rng.below(48),
            _ => 1 + rng.below(9000),
        };
        // Never more fragments than the plugin's limit of 2048 per receive.
        let len = want.max(dst_len.div_ceil(2000)).min(dst_len - at);
        let src = match (kind, metas.last()) {
            (0, _) => rng.below(pages) * 4096,
            (3, Some(LoadMeta { src_off, len: prev, .. }))
                if rng.below(2) == 0 && (*src_off + *prev) as usize + len <= pool_len =>
            {
                (*src_off + *prev) as usize
            }
            _ => rng.below(pool_len - len + 1),
        };
        metas.push(LoadMeta { src_off: src as u32, len: len as u32, dst_off: at as u64 });
        at += len;
    }
    if rng.below(2) == 0 {
        rng.shuffle(&mut metas);
    }
    Receive { dst_at, dst_len, metas }
}

#[test]
fn random_fragment_patterns_match_a_cpu_gather() {
    let Some(_ctx) = gpu() else { return };
    let mut rng = Rng::new("random_fragment_patterns_match_a_cpu_gather");
    let pool = Region::new(rng.bytes(8 << 20));
    // Receives placed one after another at random alignments, with guard gaps between them.
    let mut receives = Vec::new();
    let mut at = 0;
    for i in 0..400 {
        at += rng.below(64);
        let dst_len = match i % 5 {
            0 => 512 << 10,
            1 => 1 + rng.below(64),
            _ => 1 + rng.below(96 << 10),
        };
        receives.push(random_receive(&mut rng, pool.expected.len(), at, dst_len));
        at += dst_len;
    }
    matches_cpu_gather_on_every_tile_path(&pool, &receives, at + 4096, "random receives");
}

#[test]
fn every_source_and_destination_alignment() {
    let Some(_ctx) = gpu() else { return };
    let mut rng = Rng::new("every_source_and_destination_alignment");
    let pool = Region::new(rng.bytes(4 << 20));
    let lens = [1usize, 3, 15, 16, 17, 31, 100, 511, 4080, 4095, 4096, 4097, 8191, 12_345];
    let mut receives = Vec::new();
    let mut at = 0usize;
    for src_align in 0..16 {
        for dst_align in 0..16 {
            for &len in &lens {
                // A 16-byte-aligned start, then the alignment under test; guard bytes either side.
                at = (at + 32).next_multiple_of(16) + dst_align;
                let src = rng.below((pool.expected.len() - len - 16) / 16) * 16 + src_align;
                // Half as one fragment, half split in two pieces that merge back into one run.
                let metas = if len > 1 && rng.below(2) == 0 {
                    let cut = 1 + rng.below(len - 1);
                    vec![
                        LoadMeta { src_off: src as u32, len: cut as u32, dst_off: 0 },
                        LoadMeta { src_off: (src + cut) as u32, len: (len - cut) as u32, dst_off: cut as u64 },
                    ]
                } else {
                    vec![LoadMeta { src_off: src as u32, len: len as u32, dst_off: 0 }]
                };
                receives.push(Receive { dst_at: at, dst_len: len, metas });
                at += len;
            }
        }
    }
    matches_cpu_gather_on_every_tile_path(&pool, &receives, at + 64, "alignment sweep");
}

#[test]
fn destinations_at_the_very_end_of_a_region_leave_the_guard_untouched() {
    let Some(_ctx) = gpu() else { return };
    let mut rng = Rng::new("destinations_at_the_very_end_of_a_region_leave_the_guard_untouched");
    let pool = Region::new(rng.bytes(1 << 20));
    for (len, guard) in [(1usize, 1usize), (17, 1), (4096, 1), (4099, 13), (65_536 + 7, 1), (100_003, 64)] {
        // The destination ends `guard` bytes before the end of the allocation; its last fragment
        // writes its last byte; the source of that fragment ends at the pool's last byte.
        let last = len.min(3000);
        let receive = Receive {
            dst_at: 5,
            dst_len: len,
            metas: vec![
                LoadMeta { src_off: 7, len: (len - last) as u32, dst_off: 0 },
                LoadMeta {
                    src_off: (pool.expected.len() - last) as u32,
                    len: last as u32,
                    dst_off: (len - last) as u64,
                },
            ],
        };
        let dst = gathered(&pool, len + 5 + guard, std::slice::from_ref(&receive));
        for config in [UnpackerConfig::default(), with_events(UnpackerConfig::default())] {
            let mut unpacker = Unpacker::new(config).expect("unpacker");
            run(&mut unpacker, &pool, &dst, std::slice::from_ref(&receive));
            assert_signalled(&unpacker, 1);
            dst.assert_matches(&format!("destination of {len} bytes, {guard} guard bytes, {config:?}"));
        }
    }
}

#[test]
fn small_rings_force_device_tile_launches_full_rings_and_in_order_completion() {
    let Some(_ctx) = gpu() else { return };
    for completion in [Completion::Word, Completion::Event] {
        small_rings(completion);
    }
}

fn small_rings(completion: Completion) {
    let mut rng = Rng::new("small_rings");
    let pool = Region::new(rng.bytes(32 << 20));
    // 512 KiB receives of shuffled whole pages: 128 tiles each, copied to the device tile buffer.
    let mut receives = Vec::new();
    for i in 0..48 {
        let mut metas: Vec<LoadMeta> = (0..128u64)
            .map(|k| LoadMeta {
                src_off: (rng.below(pool.expected.len() / 4096) * 4096) as u32,
                len: 4096,
                dst_off: k * 4096,
            })
            .collect();
        rng.shuffle(&mut metas);
        receives.push(Receive { dst_at: i * (512 << 10), dst_len: 512 << 10, metas });
    }
    let dst = gathered(&pool, 48 * (512 << 10) + 64, &receives);
    let mut unpacker = Unpacker::new(UnpackerConfig {
        tiles_per_launch: 3000,
        launches_in_flight: 2,
        inline_tiles: 0,
        completion,
        ..UnpackerConfig::default()
    })
    .expect("unpacker");
    assert_eq!(unpacker.completion(), completion);
    assert!(unpacker.kernels().max_inline() >= INLINE_SMALL, "{:?}", unpacker.kernels());
    // Batches of 20 receives (2560 tiles); with two slots a batch may have to wait for one
    // (Submit::Full).
    let mut tickets = Vec::new();
    for chunk in receives.chunks(20) {
        for r in chunk {
            let layout = receive_layout(&pool, &dst, r.dst_at, r.dst_len);
            loop {
                // SAFETY: pool and dst are live device Regions declared before the unpacker (so they outlive
                // it and its launches); cpu_gather placed this receive in dst.expected, which is as long as
                // dst, so [dst_at, dst_at + dst_len) lies inside dst; nothing else writes dst until the final
                // check.
                match unsafe { unpacker.submit(&layout, &r.metas) }.expect("submit") {
                    Submit::Queued(t) => {
                        tickets.push(t);
                        break;
                    }
                    Submit::Full => {
                        unpacker.poll().expect("poll");
                    }
                }
            }
        }
        assert_eq!(unpacker.pending_tiles(), chunk.len() * 128);
        assert!(unpacker.launch().expect("launch"));
    }
    let mut last = 0;
    while unpacker.launches_in_flight() > 0 {
        let done = unpacker.poll().expect("poll");
        assert!(done >= last, "the watermark never goes back");
        last = done;
    }
    assert_eq!(unpacker.poll().unwrap(), 48);
    assert_eq!(tickets, (0..48).collect::<Vec<u64>>());
    assert!(!unpacker.launch().expect("nothing pending"), "an empty batch launches nothing");
    // 48 receives in batches of 20, 20 and 8, each launched once.
    assert_signalled(&unpacker, 3);
    dst.assert_matches(&format!("device tile batches, {completion:?}"));
}

#[test]
fn invalid_and_empty_receives() {
    let Some(_ctx) = gpu() else { return };
    for config in [UnpackerConfig::default(), with_events(UnpackerConfig::default())] {
        invalid_and_empty(config);
    }
}

fn invalid_and_empty(config: UnpackerConfig) {
    let mut rng = Rng::new("invalid_and_empty");
    let pool = Region::new(rng.bytes(1 << 20));
    let mut dst = Region::guarded(3 * 4096 + 64);
    let mut unpacker = Unpacker::new(config).expect("unpacker");
    let layout = |at: usize, len: usize| receive_layout(&pool, &dst, at, len);
    // One byte past the destination: rejected, nothing queued, nothing written.
    let bad = [LoadMeta { src_off: 0, len: 4096, dst_off: 1 }];
    // SAFETY: pool and dst are live Regions that outlive the unpacker; the meta reaching past the destination
    // is refused before anything is queued.
    let err = unsafe { unpacker.submit(&layout(0, 4096), &bad) }.unwrap_err();
    assert!(err.to_string().contains("destination"), "{err}");
    let too_many = vec![LoadMeta { src_off: 0, len: 1, dst_off: 0 }; 2049];
    // SAFETY: pool and dst are live Regions that outlive the unpacker; more than 2048 metas are refused
    // before anything is queued.
    assert!(unsafe { unpacker.submit(&layout(0, 4096), &too_many) }.is_err());
    assert_eq!(unpacker.submitted(), 0);
    // Empty receives (zero-size requests) still get tickets and complete in order.
    // SAFETY: an empty receive names no bytes of the live dst Region.
    assert_eq!(unsafe { unpacker.submit(&layout(0, 0), &[]) }.unwrap(), Submit::Queued(0));
    let good = [LoadMeta { src_off: 4096 * 7 + 3, len: 4096, dst_off: 0 }];
    // SAFETY: [4096, 8192) lies inside dst's 3 * 4096 + 64 bytes and the meta's source page inside the 1 MiB
    // pool; both Regions outlive the unpacker.
    assert_eq!(unsafe { unpacker.submit(&layout(4096, 4096), &good) }.unwrap(), Submit::Queued(1));
    // SAFETY: an empty receive names no bytes of the live dst Region.
    assert_eq!(unsafe { unpacker.submit(&layout(0, 0), &[]) }.unwrap(), Submit::Queued(2));
    assert_eq!(unpacker.finish().unwrap(), 3);
    assert_signalled(&unpacker, 1);
    // A batch of empty receives alone launches no kernel, yet completes in order behind a real one.
    let one = [LoadMeta { src_off: 4096 * 9, len: 4096, dst_off: 0 }];
    // SAFETY: [8192, 12288) lies inside dst's 3 * 4096 + 64 bytes and the meta's source page inside the 1 MiB
    // pool; both Regions outlive the unpacker.
    assert_eq!(unsafe { unpacker.submit(&layout(8192, 4096), &one) }.unwrap(), Submit::Queued(3));
    assert!(unpacker.launch().unwrap());
    // SAFETY: an empty receive names no bytes of the live dst Region.
    assert_eq!(unsafe { unpacker.submit(&layout(0, 0), &[]) }.unwrap(), Submit::Queued(4));
    assert!(unpacker.launch().unwrap());
    assert!(unpacker.poll().unwrap() <= 5);
    assert_eq!(unpacker.finish().unwrap(), 5);
    assert_signalled(&unpacker, 3);
    dst.expected[4096..8192].copy_from_slice(&pool.expected[4096 * 7 + 3..4096 * 8 + 3]);
    dst.expected[8192..12288].copy_from_slice(&pool.expected[4096 * 9..4096 * 10]);
    dst.assert_matches(&format!("after rejected and empty receives, {:?}", config.completion));
}

#[test]
fn every_parameter_block_size_carries_its_tiles() {
    let Some(_ctx) = gpu() else { return };
    let mut rng = Rng::new("every_parameter_block_size_carries_its_tiles");
    let pool = Region::new(rng.bytes(16 << 20));
    let config = UnpackerConfig { inline_tiles: usize::MAX, ..UnpackerConfig::default() };
    let mut unpacker = Unpacker::new(config).expect("unpacker");
    let max_inline = unpacker.kernels().max_inline();
    // Just under and at each variant's capacity (small, medium, large), then one past the largest.
    for pages in [1usize, 127, 128, 129, 253, 254, 255, 1023, 1024, 1025, 2044, 2045, 2046] {
        let pages = pages.min(max_inline + 1);
        let mut metas: Vec<LoadMeta> = (0..pages)
            .map(|k| LoadMeta {
                src_off: (rng.below(pool.expected.len() / 4096) * 4096 + rng.below(16)) as u32 % (15 << 20),
                len: 4096,
                dst_off: (k * 4096) as u64,
            })
            .collect();
        rng.shuffle(&mut metas);
        // A 16-byte-aligned destination: one tile per page (sources are misaligned instead).
        let receive = Receive { dst_at: 0, dst_len: pages * 4096, metas };
        let dst = gathered(&pool, pages * 4096 + 64, std::slice::from_ref(&receive));
        run(&mut unpacker, &pool, &dst, std::slice::from_ref(&receive));
        dst.assert_matches(&format!("{pages} tiles"));
    }
}

/// Many launches in flight at once, through every launch path: completion is reported in launch
/// order, and each receive's bytes are already in place the moment the watermark covers it (read
/// back at once, while later launches still run). Far more launches than slots, so every slot's
/// counter and word are reused many times: a counter the kernel failed to reset would leave a
/// word unwritten and show up as a stream-check retirement.
#[test]
fn many_launches_in_flight_complete_in_order_with_their_bytes_in_place() {
    let Some(_ctx) = gpu() else { return };
    let mut rng = Rng::new("many_launches_in_flight_complete_in_order_with_their_bytes_in_place");
    let pool = Region::new(rng.bytes(32 << 20));
    let count = 96;
    // 7 to 300 pages of every fragment kind: launches take the tiny, small and mapped paths.
    let sizes = [128usize, 200, 300, 7];
    let mut receives = Vec::new();
    let mut at = 0;
    for i in 0..count {
        let len = sizes[i % sizes.len()] * 4096 - (i % 3) * 5;
        receives.push(random_receive(&mut rng, pool.expected.len(), at, len));
        at += len + 16 + rng.below(16);
    }
    for completion in [Completion::Word, Completion::Event] {
        let config = UnpackerConfig { launches_in_flight: 32, completion, ..UnpackerConfig::default() };
        let dst = gathered(&pool, at + 64, &receives);
        let mut unpacker = Unpacker::new(config).expect("unpacker");
        let mut checked = 0usize;
        let mut max_in_flight = 0;
        let check_done = |done: u64, checked: &mut usize| {
            assert!(done as usize >= *checked, "the watermark never goes back");
            while *checked < done as usize {
                let r = &receives[*checked];
                let mut actual = vec![0u8; r.dst_len];
                // SAFETY: check_done reads only receives the watermark reports finished, and cpu_gather
                // placed each inside dst.expected, which is as long as dst; actual has dst_len bytes.
                unsafe { result::memcpy_dtoh_sync(&mut actual, dst.ptr + r.dst_at as u64) }.expect("download");
                assert!(
                    actual == dst.expected[r.dst_at..r.dst_at + r.dst_len],
                    "receive {} reported done before its bytes were in place ({completion:?})",
                    *checked
                );
                *checked += 1;
            }
        };
        for (i, r) in receives.iter().enumerate() {
            let layout = receive_layout(&pool, &dst, r.dst_at, r.dst_len);
            loop {
                // SAFETY: pool and dst are live device Regions declared before the unpacker (so they outlive
                // it); cpu_gather placed this receive in dst.expected, which is as long as dst, so its range
                // lies inside dst; nothing else writes dst meanwhile.
                match unsafe { unpacker.submit(&layout, &r.metas) }.expect("submit") {
                    Submit::Queued(ticket) => {
                        assert_eq!(ticket, i as u64);
                        break;
                    }
                    Submit::Full => {
                        let done = unpacker.poll().expect("poll");
                        check_done(done, &mut checked);
                    }
                }
            }
            // One launch per receive; no poll until the ring is full.
            assert!(unpacker.launch().expect("launch"));
            max_in_flight = max_in_flight.max(unpacker.launches_in_flight());
        }
        while unpacker.launches_in_flight() > 0 {
            let done = unpacker.poll().expect("poll");
            assert!(done <= count as u64);
            check_done(done, &mut checked);
        }
        assert_eq!(checked, count);
        assert_eq!(max_in_flight, 32, "the ring filled before the first poll");
        assert_signalled(&unpacker, count as u64);
        dst.assert_matches(&format!("many launches in flight, {completion:?}"));
    }
}

/// A caller under a lock asks for the kernels without waiting for NVRTC and without building them:
/// `if_built` answers at once, `None` while none is built, also while another thread builds them,
/// and the kernels once that build ended. In a process of its own, so that no other test built
/// them first.
#[test]
fn asking_under_a_lock_neither_waits_nor_builds() {
    use std::time::{Duration, Instant};
    use uccl_tcpx::internal::cuda::unpack::UnpackKernels;
    const NAME: &str = "asking_under_a_lock_neither_waits_nor_builds";
    if !testkit::child::is_child(NAME) {
        if gpu().is_some() && !common::gpu::no_nvrtc() {
            testkit::child::ChildTest::new(NAME).run();
        }
        return;
    }
    assert!(uccl_tcpx::internal::cuda::available(), "a CUDA driver");
    for _ in 0..100 {
        assert!(UnpackKernels::if_built(0).is_none(), "found built before any build");
    }
    let started = Instant::now();
    let builder = std::thread::spawn(|| UnpackKernels::for_device(0).map(drop));
    // Asked while the other thread builds: an ask that waited for the build would answer with
    // the kernels, so answers of none while the build runs show that asks do not wait.
    let mut asks = 0;
    while !builder.is_finished() {
        if UnpackKernels::if_built(0).is_some() {
            break;
        }
        asks += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    builder.join().unwrap().expect("the kernels build");
    let build = started.elapsed();
    println!("{asks} asks answered none during a build of {build:?}");
    assert!(asks > 0, "the build ({build:?}) ended before the first ask");
    assert!(matches!(UnpackKernels::if_built(0), Some(Ok(_))), "built once the build ended");
}
