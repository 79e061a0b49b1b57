//! Copies of many pieces between device addresses of one GPU by one kernel (`copy_pieces` in
//! unpack/kernel.cu): the host lists each piece once, 24 bytes, in a pinned list, copies the list
//! to device memory ahead of the launch on the same stream, and the kernel cuts the tiles. A KV
//! cache's block table of 8,192 blocks of 16 KiB is 8,192 entries, where a list of tiles held four
//! each, cut on the host.
//!
//! A call's first launch goes once it listed [`FIRST_LAUNCH`] pieces and each later one at twice
//! the one before, up to a full list, so the GPU copies the first pieces of a long call while the
//! caller still lists the rest. Launches alternate between the caller's stream and a side stream
//! that joins it at the call's end, so one launch's last blocks overlap the next one's first (one
//! stream ran a call's launches one after another, each with its tail, and 8,192 blocks of 16
//! KiB went at 0.55-0.65 of one copy between two H200s, against 0.8 in one launch of 2,048 pieces
//! of 64 KiB). A list is refilled once the launch that read it finished; with every list in
//! flight the caller waits for the oldest, which the GPU is already copying.

use std::sync::Arc;

use cudarc::driver::sys;

use super::memory::DeviceBuffer;
use super::stream::{Event, Stream};
use super::unpack::{PinnedList, Plain, UnpackKernels};
use super::{Gpu, check};
use crate::error::Result;

/// One copy: `len` bytes from `src` to `dst` (`struct Piece` in kernel.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

// SAFETY: three u64 words.
unsafe impl Plain for Piece {}

/// Pieces in one list (384 KiB of pinned memory), and so at most in one launch.
const LIST_PIECES: usize = 16384;
/// Lists per copier, allocated as calls need them (6 MiB of pinned memory at most).
const MAX_LISTS: usize = 16;
/// A longer piece is listed as several of this size: one warp copies a piece, four tiles of it at
/// most, so a call of large pieces spreads over the GPU as one of small pieces does.
const PIECE_SPLIT: u64 = 16 << 10;
/// Pieces a call lists before its first launch: about one wave of blocks on an H100.
const FIRST_LAUNCH: usize = 2048;

/// A pinned list the host fills, and its copy in device memory that the kernel reads: read
/// through the mapping instead, every block's load of its piece crossed PCIe, and lists of 16,384
/// pieces of 16 KiB went at about 250 GB/s between two H200s, against 388 for one copy.
struct List {
    pieces: PinnedList<Piece>,
    device: DeviceBuffer,
    /// Recorded behind the last launch that read the list (an event never recorded reports done).
    read: Event,
    /// When it was last launched, in this copier's launches: the oldest is waited for first.
    launched: u64,
}

pub struct PieceCopier {
    kernels: Arc<UnpackKernels>,
    gpu: Arc<Gpu>,
    lists: Vec<List>,
    /// The list being filled and how many pieces it holds.
    filling: Option<(usize, usize)>,
    /// Pieces the list being filled holds when it is launched.
    launch_at: usize,
    launches: u64,
    /// Every other launch of a call goes here; `fork`, recorded before the call's first launch,
    /// lets it start after what the caller's stream held when the call began, `join` lets the
    /// caller's stream go on after it.
    side: Stream,
    fork: Event,
    join: Event,
    /// The call under way launched on `side`.
    forked: bool,
    /// Launches of the call under way.
    call_launches: u64,
}

impl PieceCopier {
    /// The copier of `gpu` if its kernels' build ended (`None` until then, as for
    /// `TileCopier::if_built`); fails where they cannot be built.
    pub fn if_built(gpu: &Arc<Gpu>) -> Option<Result<PieceCopier>> {
        let kernels = UnpackKernels::if_built(gpu.ordinal() as usize)?;
        Some(kernels.and_then(|kernels| {
            Ok(PieceCopier {
                kernels,
                gpu: gpu.clone(),
                lists: Vec::new(),
                filling: None,
                launch_at: FIRST_LAUNCH,
                launches: 0,
                side: Stream::new(gpu)?,
                fork: Event::new(gpu)?,
                join: Event::new(gpu)?,
                forked: false,
                call_launches: 0,
            })
        }))
    }

    /// Launches so far.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Lists `len` bytes from `src` to `dst`, launching every list that fills.
    ///
    /// # Safety
    /// The GPU's context is current and `stream` is of it; both ranges are device memory this GPU's
    /// kernels address, below 2^52 (`unpack::addressable`), valid and reserved to this copy until
    /// the stream passed the launch that carries it ([`finish`](Self::finish) launches the rest).
    #[inline]
    pub unsafe fn push(&mut self, stream: &Stream, src: u64, dst: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE_SPLIT);
            // SAFETY: forwarded from the caller.
            unsafe { self.push_one(stream, Piece { src: src + done, dst: dst + done, len: n })? };
            done += n;
        }
        Ok(())
    }

    #[inline]
    unsafe fn push_one(&mut self, stream: &Stream, piece: Piece) -> Result<()> {
        let (index, count) = match self.filling {
            Some(filling) => filling,
            None => (self.free_list()?, 0),
        };
        self.lists[index].pieces.as_mut_slice()[count] = piece;
        self.filling = Some((index, count + 1));
        if count + 1 == self.launch_at {
            // SAFETY: forwarded from the caller.
            unsafe { self.launch(stream, true)? };
            self.launch_at = (self.launch_at * 2).min(LIST_PIECES);
        }
        Ok(())
    }

    /// Launches the pieces listed since the last launch, if any, which ends the call: the next
    /// call's first launch comes early again. On an error the caller must [`abandon`](Self::abandon)
    /// the call.
    ///
    /// # Safety
    /// As for [`push`](Self::push).
    pub unsafe fn finish(&mut self, stream: &Stream) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch(stream, false)? };
        // On an error the caller abandons the call, which waits for the side stream.
        self.join(stream)?;
        self.end_call();
        Ok(())
    }

    /// The caller's stream waits for the side stream's launches of this call.
    fn join(&mut self, stream: &Stream) -> Result<()> {
        if self.forked {
            self.join.record(&self.side)?;
            stream.wait(&self.join)?;
        }
        Ok(())
    }

    fn end_call(&mut self) {
        (self.launch_at, self.forked, self.call_launches) = (FIRST_LAUNCH, false, 0);
    }

    /// Launches the list being filled on the call's next stream. `more`: the call goes on, so its
    /// first launch marks the fork before it goes, and the side stream's first launch need not wait
    /// for it (marked after it, the side waited for the first launch to end, and 8,192 pieces of 16
    /// KiB between two H200s went at .83-.86 of one copy against .87-.90, `pieces_bench`).
    unsafe fn launch(&mut self, stream: &Stream, more: bool) -> Result<()> {
        let Some((index, count)) = self.filling.take() else {
            return Ok(());
        };
        self.call_launches += 1;
        // A call has a second launch only if its first came from `push`, which marked the fork.
        if self.call_launches == 1 && more {
            self.fork.record(stream)?;
        }
        let stream = if self.call_launches.is_multiple_of(2) {
            if !self.forked {
                self.side.wait(&self.fork)?;
                self.forked = true;
            }
            &self.side
        } else {
            stream
        };
        let list = &mut self.lists[index];
        let device = list.device.addr() as u64;
        // SAFETY: the pinned list holds `count` pieces, its device copy room for all of them, both
        // of this GPU's context, current on this thread with the stream of it; neither is reused
        // before `read` fired, recorded behind the launch; the pieces' ranges are the caller's.
        unsafe {
            check(
                sys::cuMemcpyHtoDAsync_v2(
                    device,
                    list.pieces.host_ptr().cast(),
                    count * size_of::<Piece>(),
                    stream.raw(),
                ),
                "cuMemcpyHtoDAsync of a piece list",
            )?;
            self.kernels.launch_pieces(stream.raw(), device, count as u32)?
        };
        self.launches += 1;
        list.launched = self.launches;
        if let Err(e) = list.read.record(stream) {
            // Unmarked, the list could be refilled under the launch: wait for it instead.
            let _ = stream.synchronize();
            return Err(e);
        }
        Ok(())
    }

    /// Drops the pieces listed since the last launch, a call that failed leaving none to the next,
    /// and waits for the side stream's launches of the call (the caller waits for its own stream).
    pub fn abandon(&mut self) {
        self.filling = None;
        if self.forked {
            let _ = self.side.synchronize();
        }
        self.end_call();
    }

    /// Frees the lists between calls (up to 6 MiB pinned and as much of the GPU's memory), after
    /// the launches that read them; the next call allocates what it needs again.
    pub fn trim(&mut self) {
        if self.filling.is_some() {
            return;
        }
        for list in &self.lists {
            let _ = list.read.synchronize();
        }
        self.lists.clear();
    }

    /// A list no launch still reads: a done one, else a new one while there are fewer than
    /// [`MAX_LISTS`], else the oldest once its launch finished. The GPU's context is current.
    fn free_list(&mut self) -> Result<usize> {
        for (index, list) in self.lists.iter().enumerate() {
            if list.read.done()? {
                return Ok(index);
            }
        }
        if self.lists.len() < MAX_LISTS {
            let list = List {
                pieces: PinnedList::new(LIST_PIECES)?,
                device: DeviceBuffer::new(self.gpu.ordinal(), LIST_PIECES * size_of::<Piece>())?,
                read: Event::new(&self.gpu)?,
                launched: 0,
            };
            self.lists.push(list);
            return Ok(self.lists.len() - 1);
        }
        let oldest = (0..self.lists.len()).min_by_key(|&i| self.lists[i].launched).unwrap_or(0);
        self.lists[oldest].read.synchronize()?;
        Ok(oldest)
    }
}

impl Drop for PieceCopier {
    fn drop(&mut self) {
        // Pinned lists are freed with the copier, with its GPU's context current (as they were
        // allocated); a launch may still be reading one.
        let _ctx = self.gpu.enter();
        for list in &self.lists {
            let _ = list.read.synchronize();
        }
        self.lists.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DeviceBuffer;

    /// GPU 0, a stream of it and its copier, the kernel built; `None` (and a note) where it cannot
    /// be built.
    fn copier() -> Option<(Arc<Gpu>, Stream, PieceCopier)> {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return None;
        }
        let gpu = Gpu::open(0).unwrap();
        let built = {
            let _ctx = gpu.enter().unwrap();
            UnpackKernels::for_device(0)
        };
        if testkit::skip_without("NVRTC", built.is_ok()) {
            return None;
        }
        let stream = Stream::new(&gpu).unwrap();
        let copier = PieceCopier::if_built(&gpu).expect("built above").unwrap();
        Some((gpu, stream, copier))
    }

    fn numbered(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 131 + seed) % 251) as u8).collect()
    }

    /// More pieces than every list of a copier holds, of odd sizes at odd places, and a few longer
    /// than one block copies: the call launches each list as it fills, reuses lists whose launch
    /// finished (or waits for the oldest), and every byte lands where the copies one by one would
    /// put it, nothing between.
    #[test]
    fn a_call_of_more_pieces_than_its_lists_hold_lands_whole() {
        let Some((gpu, stream, mut copier)) = copier() else { return };
        const SMALL: usize = LIST_PIECES * MAX_LISTS + 1000;
        const SLOT: usize = 96;
        const LARGE: [usize; 3] = [PIECE_SPLIT as usize + 1, 3 * PIECE_SPLIT as usize, 200_003];
        let large_at = SMALL * SLOT;
        let len = large_at + LARGE.iter().map(|n| n + 64).sum::<usize>();
        let data = numbered(len, 7);
        let mut src = DeviceBuffer::new(0, len).unwrap();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, len).unwrap();
        dst.fill(0).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        // (source offset, destination offset, length): small pieces from slot i to slot
        // SMALL - 1 - i at odd offsets, then the long ones in place.
        let mut copies: Vec<(usize, usize, usize)> =
            (0..SMALL).map(|i| (i * SLOT + i % 13, (SMALL - 1 - i) * SLOT + 1 + i % 7, 1 + i % 83)).collect();
        let mut at = large_at;
        for n in LARGE {
            copies.push((at + 5, at + 3, n));
            at += n + 64;
        }
        let mut want = vec![0u8; len];
        for &(so, dof, n) in &copies {
            want[dof..dof + n].copy_from_slice(&data[so..so + n]);
        }
        {
            let _ctx = gpu.enter().unwrap();
            for &(so, dof, n) in &copies {
                // SAFETY: both ranges lie in live buffers of this test, untouched until the stream
                // passed the copies; the GPU's context is current.
                unsafe { copier.push(&stream, s + so as u64, d + dof as u64, n as u64) }.unwrap();
            }
            // SAFETY: as above.
            unsafe { copier.finish(&stream) }.unwrap();
            stream.synchronize().unwrap();
        }
        assert!(dst.to_vec().unwrap() == want, "every piece in place, nothing else written");
        let listed = SMALL + LARGE.iter().map(|&n| (n as u64).div_ceil(PIECE_SPLIT) as usize).sum::<usize>();
        // Launches at 2,048, 4,096, ... up to a full list, then at every full list, then the rest.
        let (mut launches, mut left, mut next) = (0, listed, FIRST_LAUNCH);
        while left > 0 {
            (launches, left, next) = (launches + 1, left.saturating_sub(next), (next * 2).min(LIST_PIECES));
        }
        assert_eq!(copier.launches(), launches, "launches at growing counts, then at every full list");
        assert!(copier.lists.len() <= MAX_LISTS);
    }

    /// A call abandoned before its end (an error on the way) launches none of the pieces it had
    /// listed since its last launch: the next call copies its own pieces only.
    #[test]
    fn an_abandoned_call_leaves_no_piece_to_the_next() {
        let Some((gpu, stream, mut copier)) = copier() else { return };
        const LEN: usize = 1 << 20;
        let data = numbered(LEN, 3);
        let mut src = DeviceBuffer::new(0, LEN).unwrap();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, LEN).unwrap();
        dst.fill(0).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        {
            let _ctx = gpu.enter().unwrap();
            for i in 0..10u64 {
                // SAFETY: both ranges lie in live buffers of this test; the call is abandoned, so
                // nothing is launched.
                unsafe { copier.push(&stream, s + i * 4096, d + i * 4096, 4096) }.unwrap();
            }
            copier.abandon();
            for i in 10..15u64 {
                // SAFETY: as above, untouched until the stream passed the copies.
                unsafe { copier.push(&stream, s + i * 4096, d + i * 4096, 4096) }.unwrap();
            }
            // SAFETY: as above.
            unsafe { copier.finish(&stream) }.unwrap();
            stream.synchronize().unwrap();
        }
        let mut want = vec![0u8; LEN];
        want[10 * 4096..15 * 4096].copy_from_slice(&data[10 * 4096..15 * 4096]);
        assert!(dst.to_vec().unwrap() == want, "only the second call's pieces landed");
        assert_eq!(copier.launches(), 1);
    }
}
