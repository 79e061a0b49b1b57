//! GPU unpack for TCPX receives: gathers the fragments a receive left scattered over the bounce
//! pool (`LoadMeta` records) into the receive's destination with one kernel launch per batch of
//! receives.
//!
//! - [`plan`]: host-side validation, merging of contiguous fragments, cutting into copy tiles.
//! - [`UnpackKernels`]: the CUDA C kernel (kernel.cu), compiled by NVRTC per device on first use.
//! - [`Unpacker`]: batching, preallocated launch ring, completion watermark fed by per-launch
//!   completion words the kernel writes to mapped host memory (or by events, [`Completion::Event`]).

mod kernels;
mod memory;
pub mod plan;
mod unpacker;

pub use kernels::{
    BLOCK_THREADS, CompletionSignal, INLINE_LARGE, INLINE_MEDIUM, INLINE_SMALL, INLINE_TINY, InlineTiles, UnpackKernels,
};
pub(crate) use memory::{PinnedList, PinnedTiles, Plain};
#[cfg(test)]
pub use plan::run_tiles;
pub use plan::{
    DstPiece, MAX_FRAGMENTS, PlanError, PlanStats, ReceiveLayout, TILE_BYTES, Tile, addressable, cut_run, plan_receive,
    plan_receive_pieces,
};
pub use unpacker::{BulkTiles, Completion, CompletionCounts, Submit, Unpacker, UnpackerConfig};
