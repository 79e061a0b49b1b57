// Gathers received fragments from the bounce pool into their destinations.
//
// The host has already validated and merged the fragment list and cut it into tiles of at most
// 4 KiB (plan.rs); one warp copies one tile. Tiles arrive either in the kernel parameters
// (unpack_inline_*) or through a pointer (unpack_tiles): the device mapping of the host's pinned
// tile buffer, or device memory the tiles were copied to.
//
// Each lane keeps UNPACK_WORDS_PER_LANE independent 16-byte loads in flight before it stores, and a
// warp's loads of one round cover 512 contiguous bytes, so small and large tiles both stream.
// Any alignment is handled without byte-wide bulk copies: the first bytes up to a 16-byte boundary
// of the destination and the last partial word are copied byte by byte (at most 15 lanes each, in
// parallel); the body is written with aligned 16-byte stores. When the source is misaligned
// relative to the destination, the body reads aligned 16-byte source words and shifts each pair
// into place with funnel shifts; the neighbouring word comes from the next lane by shuffle, so
// every source word is loaded once.
//
// The kernel runs after the receive completed and nothing writes the pool pages until the host
// returns them, so read-once non-coherent loads are safe.
//
// Completion: a launch that carries a completion signal (word != 0) reports its end itself. Every
// block counts itself done in the launch slot's device counter once its warps' stores are issued
// and fenced; the last one resets the counter (the slot's next launch is queued behind this one on
// the same stream) and, after a system-scope fence, stores the launch's sequence number to the
// slot's completion word in mapped host memory, which the host polls instead of a CUDA event.
//
// Built by NVRTC with -D definitions from kernels.rs: UNPACK_INLINE_TINY, UNPACK_INLINE_SMALL,
// UNPACK_INLINE_MEDIUM, UNPACK_INLINE_LARGE (tile capacities of the inline variants; 0 leaves a
// variant out). No __launch_bounds__: with it ptxas capped registers at 64 and spilled the
// in-flight words.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define UNPACK_WORDS_PER_LANE 8
#define UNPACK_WARP 32
#define UNPACK_FULL_MASK 0xffffffffu

// Mirrors plan::Tile: the source address with len - 1 in the top 12 bits, then the destination.
#define UNPACK_ADDRESS_BITS 52
struct __align__(16) Tile {
    u64 src_and_len;
    u64 dst;
};

// Mirrors kernels::CompletionSignal. word == 0: the launch signals nothing (the host uses an event).
struct CompletionSignal {
    u64 seq;      // stored to `word` when the whole launch is done
    u64 counter;  // device address of the slot's u32 block counter, 0 between launches
    u64 word;     // device address of the slot's u64 completion word in mapped host memory
};

// Mirrors kernels::InlineTiles: the used prefix of `tiles` is `count` long.
template <int N>
struct InlineTiles {
    u32 count;
    u32 reserved;
    CompletionSignal signal;
    Tile tiles[N];
};

struct Word {
    u32 x, y, z, w;
};

__device__ __forceinline__ Word load_word(u64 addr) {
    Word v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(addr));
    return v;
}

__device__ __forceinline__ void store_word(u64 addr, const Word& v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ u32 load_byte(u64 addr) {
    u32 b;
    asm("ld.global.nc.u8 %0, [%1];" : "=r"(b) : "l"(addr));
    return b;
}

__device__ __forceinline__ void store_byte(u64 addr, u32 b) {
    asm volatile("st.global.u8 [%0], %1;" ::"l"(addr), "r"(b) : "memory");
}

// Bytes [shift, shift + 16) of the little-endian 32-byte concatenation a|b, for shift in 1..15.
__device__ __forceinline__ Word realign(const Word& a, const Word& b, u32 shift) {
    const u32 bits = (shift & 3u) * 8u;
    u32 w0, w1, w2, w3, w4;
    switch (shift >> 2) {
    case 0: w0 = a.x; w1 = a.y; w2 = a.z; w3 = a.w; w4 = b.x; break;
    case 1: w0 = a.y; w1 = a.z; w2 = a.w; w3 = b.x; w4 = b.y; break;
    case 2: w0 = a.z; w1 = a.w; w2 = b.x; w3 = b.y; w4 = b.z; break;
    default: w0 = a.w; w1 = b.x; w2 = b.y; w3 = b.z; w4 = b.w; break;
    }
    Word o;
    o.x = __funnelshift_r(w0, w1, bits);
    o.y = __funnelshift_r(w1, w2, bits);
    o.z = __funnelshift_r(w2, w3, bits);
    o.w = __funnelshift_r(w3, w4, bits);
    return o;
}

__device__ __forceinline__ Word shuffle_word(const Word& v, u32 from_lane) {
    Word o;
    o.x = __shfl_sync(UNPACK_FULL_MASK, v.x, from_lane);
    o.y = __shfl_sync(UNPACK_FULL_MASK, v.y, from_lane);
    o.z = __shfl_sync(UNPACK_FULL_MASK, v.z, from_lane);
    o.w = __shfl_sync(UNPACK_FULL_MASK, v.w, from_lane);
    return o;
}

// Source and destination both 16-byte aligned: `words` 16-byte words.
__device__ __forceinline__ void copy_aligned(u64 src, u64 dst, u32 words, u32 lane) {
    for (u32 base = 0; base < words; base += UNPACK_WARP * UNPACK_WORDS_PER_LANE) {
        Word v[UNPACK_WORDS_PER_LANE];
#pragma unroll
        for (int k = 0; k < UNPACK_WORDS_PER_LANE; ++k) {
            const u32 i = base + k * UNPACK_WARP + lane;
            if (i < words) v[k] = load_word(src + 16ull * i);
        }
#pragma unroll
        for (int k = 0; k < UNPACK_WORDS_PER_LANE; ++k) {
            const u32 i = base + k * UNPACK_WARP + lane;
            if (i < words) store_word(dst + 16ull * i, v[k]);
        }
    }
}

// Destination 16-byte aligned, source `shift` (1..15) bytes past the aligned address `src_aligned`.
// Output word i is made of aligned source words i and i + 1; words 0..=words all contain fragment
// bytes, so no load leaves the fragment's 16-byte blocks.
__device__ __forceinline__ void copy_shifted(u64 src_aligned, u64 dst, u32 words, u32 shift, u32 lane) {
    const u32 next_lane = (lane + 1) & (UNPACK_WARP - 1);
    for (u32 base = 0; base < words; base += UNPACK_WARP * UNPACK_WORDS_PER_LANE) {
        Word v[UNPACK_WORDS_PER_LANE];
        Word after;
#pragma unroll
        for (int k = 0; k < UNPACK_WORDS_PER_LANE; ++k) {
            const u32 i = base + k * UNPACK_WARP + lane;
            if (i <= words) v[k] = load_word(src_aligned + 16ull * i);
        }
        // Lane 31's last output needs the first word of the following round.
        const u32 after_index = base + UNPACK_WARP * UNPACK_WORDS_PER_LANE;
        if (lane == 0 && after_index <= words) after = load_word(src_aligned + 16ull * after_index);
#pragma unroll
        for (int k = 0; k < UNPACK_WORDS_PER_LANE; ++k) {
            // Every lane passes its word to the lane below; lane 0 instead passes the first word of
            // the next row, which is what lane 31 needs.
            const Word& next_row = (k + 1 < UNPACK_WORDS_PER_LANE) ? v[(k + 1) % UNPACK_WORDS_PER_LANE] : after;
            const Word give = lane == 0 ? next_row : v[k];
            const Word following = shuffle_word(give, next_lane);
            const u32 i = base + k * UNPACK_WARP + lane;
            if (i < words) store_word(dst + 16ull * i, realign(v[k], following, shift));
        }
    }
}

__device__ __forceinline__ void copy_tile(u64 src, u64 dst, u32 len, u32 lane) {
    u32 head = (16u - (u32)(dst & 15u)) & 15u;
    if (head > len) head = len;
    const u64 body_src = src + head;
    const u64 body_dst = dst + head;
    const u32 words = (len - head) >> 4;
    const u32 tail = (len - head) & 15u;
    const u64 tail_at = 16ull * words + lane;
    // The edge bytes are loaded first and stored last so that their latency overlaps the body's.
    const bool has_head = lane < head;
    const bool has_tail = lane < tail;
    u32 head_byte = 0, tail_byte = 0;
    if (has_head) head_byte = load_byte(src + lane);
    if (has_tail) tail_byte = load_byte(body_src + tail_at);
    if (words != 0) {
        const u32 shift = (u32)(body_src & 15u);
        if (shift == 0)
            copy_aligned(body_src, body_dst, words, lane);
        else
            copy_shifted(body_src - shift, body_dst, words, shift, lane);
    }
    if (has_head) store_byte(dst + lane, head_byte);
    if (has_tail) store_byte(body_dst + tail_at, tail_byte);
}

__device__ __forceinline__ void store_completion_word(u64 addr, u64 v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(v) : "memory");
}

// Called by every thread of every block after its copies (no thread may have returned early).
__device__ __forceinline__ void signal_completion(const CompletionSignal& signal) {
    if (signal.word == 0) return;
    // All warps' stores are issued before thread 0 counts the block; its fence orders them before
    // the count device-wide, and the last block's system fence orders all of them before the word.
    __syncthreads();
    if (threadIdx.x != 0) return;
    __threadfence();
    u32* counter = (u32*)signal.counter;
    if (atomicAdd(counter, 1u) + 1 == gridDim.x) {
        *counter = 0;
        __threadfence_system();
        store_completion_word(signal.word, signal.seq);
    }
}

__device__ __forceinline__ void unpack_block(const Tile* tiles, u32 count, const CompletionSignal& signal) {
    const u32 lane = threadIdx.x & (UNPACK_WARP - 1);
    const u32 tile = blockIdx.x * (blockDim.x / UNPACK_WARP) + threadIdx.x / UNPACK_WARP;
    if (tile < count) {
        const Tile t = tiles[tile];
        const u64 src = t.src_and_len & ((1ull << UNPACK_ADDRESS_BITS) - 1);
        const u32 len = (u32)(t.src_and_len >> UNPACK_ADDRESS_BITS) + 1;
        copy_tile(src, t.dst, len, lane);
    }
    signal_completion(signal);
}

extern "C" __global__ void unpack_tiles(const Tile* __restrict__ tiles, u32 count, const CompletionSignal signal) {
    unpack_block(tiles, count, signal);
}

// Mirrors pieces::Piece: one copy of a list the host did not cut into tiles. Warp w of block b
// takes pieces 4b + w, then a grid's worth further on, and copies each tile after tile, cut as the
// host cuts them (plan.rs): the first ends on a 16-byte boundary of the destination, the rest are
// whole TILE bytes. The host lists a piece once (24 bytes) instead of each tile, and splits long
// ones, so that a warp copies at most a few tiles of each. One block per 16 KiB piece (a tile per
// warp) ran its blocks' start and end for every 16 KiB and copied between two H200s at about 260
// GB/s against 390 for 64 KiB per block.
#define UNPACK_TILE 4096ull
struct Piece {
    u64 src;
    u64 dst;
    u64 len;
};

extern "C" __global__ void copy_pieces(const Piece* __restrict__ pieces, u32 count) {
    const u32 lane = threadIdx.x & (UNPACK_WARP - 1);
    const u32 warps = blockDim.x / UNPACK_WARP;
    const u64 stride = (u64)gridDim.x * warps;
    for (u64 p = (u64)blockIdx.x * warps + threadIdx.x / UNPACK_WARP; p < count; p += stride) {
        const Piece piece = pieces[p];
        u64 at = 0;
        while (at < piece.len) {
            u64 n = at == 0 ? UNPACK_TILE - (piece.dst & 15ull) : UNPACK_TILE;
            if (n > piece.len - at) n = piece.len - at;
            copy_tile(piece.src + at, piece.dst + at, (u32)n, lane);
            at += n;
        }
    }
}

#define UNPACK_DEFINE_INLINE(NAME, N)                                                                  \
    extern "C" __global__ void NAME(const __grid_constant__ InlineTiles<N> p) {                       \
        unpack_block(p.tiles, p.count, p.signal);                                                      \
    }

#if UNPACK_INLINE_TINY > 0
UNPACK_DEFINE_INLINE(unpack_inline_tiny, UNPACK_INLINE_TINY)
#endif
#if UNPACK_INLINE_SMALL > 0
UNPACK_DEFINE_INLINE(unpack_inline_small, UNPACK_INLINE_SMALL)
#endif
#if UNPACK_INLINE_MEDIUM > 0
UNPACK_DEFINE_INLINE(unpack_inline_medium, UNPACK_INLINE_MEDIUM)
#endif
#if UNPACK_INLINE_LARGE > 0
UNPACK_DEFINE_INLINE(unpack_inline_large, UNPACK_INLINE_LARGE)
#endif
