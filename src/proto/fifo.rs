//! The 64-byte FIFO item shared with C callers, and the capability it carries.
//!
//! C code allocates and copies these items opaquely, so the in-memory layout is part of the
//! ABI: it is pinned with compile-time assertions, and the wire form reuses the same offsets so
//! the two can never drift apart.
//!
//! The fields are UCCL's, `engine_offset` included (bytes 32..36), because UCCL's engine writes
//! that field on every chunk it posts. This library never reads it. The capability (region id,
//! token, place, magic, version) lives in the 28 bytes after it, which UCCL leaves as padding:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..32  | addr, size, rkey, nmsgs, rid, idx       |
//! | 32..36 | engine_offset (ignored)                 |
//! | 36..44 | region id                               |
//! | 44..52 | token                                   |
//! | 52..56 | magic `UTX1`                            |
//! | 56..58 | capability version (3)                  |
//! | 58..60 | place: 0 host memory, 1 + n GPU n       |
//! | 60..64 | zero                                    |
//!
//! Version 1 kept the capability at bytes 32..54, where UCCL's engine overwrote the region id;
//! version 2 had no place. Both are refused with an error that names the version.

use core::ffi::c_char;
use core::mem::{align_of, offset_of, size_of};

use super::ProtoError;
use super::wire::{Reader, get_at, put_at};

pub(crate) const FIFO_ITEM_SIZE: usize = 64;
pub(crate) const CAP_MAGIC: u32 = 0x3158_5455;
pub(crate) const CAP_VERSION: u16 = 3;

const PADDING_LEN: usize = 28;
/// Capability bytes at the front of the padding; the remainder must stay zero.
const CAP_LEN: usize = 8 + 8 + 4 + 2 + 2;

/// Where version 1 put its magic and version, as offsets into the whole item.
const V1_MAGIC_AT: usize = 48;
const V1_VERSION_AT: usize = 52;

const FOREIGN_ITEM: ProtoError =
    ProtoError::Invalid("FifoItem was not minted by uccl-tcpx prepare_fifo or is corrupted");
const V1_ITEM: ProtoError = ProtoError::Invalid(
    "FifoItem was minted by an older uccl-tcpx (capability version 1, at bytes 32..54); this build reads \
     version 3 at bytes 36..64: mint it again with prepare_fifo on an engine of this version",
);
const V2_ITEM: ProtoError = ProtoError::Invalid(
    "FifoItem was minted by an older uccl-tcpx (capability version 2, which names no memory place); this \
     build reads version 3: mint it again with prepare_fifo on an engine of this version",
);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FifoItem {
    pub addr: u64,
    pub size: u32,
    pub rkey: u32,
    pub nmsgs: u32,
    pub rid: u32,
    pub idx: u64,
    /// UCCL's field, which its engine sets per chunk; ignored here.
    pub engine_offset: u32,
    /// The capability (region id, token, magic, version), then zeros.
    pub padding: [c_char; 28],
}

const _: () = {
    assert!(size_of::<FifoItem>() == FIFO_ITEM_SIZE);
    assert!(align_of::<FifoItem>() == 8);
    assert!(offset_of!(FifoItem, addr) == 0);
    assert!(offset_of!(FifoItem, size) == 8);
    assert!(offset_of!(FifoItem, rkey) == 12);
    assert!(offset_of!(FifoItem, nmsgs) == 16);
    assert!(offset_of!(FifoItem, rid) == 20);
    assert!(offset_of!(FifoItem, idx) == 24);
    assert!(offset_of!(FifoItem, engine_offset) == 32);
    assert!(offset_of!(FifoItem, padding) == 36);
    assert!(offset_of!(FifoItem, padding) + PADDING_LEN == FIFO_ITEM_SIZE);
    assert!(CAP_LEN <= PADDING_LEN);
    // Where version 1 kept its version, a version-2 item holds the low half of its magic, so a
    // well-formed version-2 item never reads as version 1.
    assert!(V1_VERSION_AT == 52 && CAP_MAGIC & 0xffff != 1);
};

/// Names a registered memory region, the token that authorises access to it, and where its memory
/// lies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capability {
    pub region: u64,
    pub token: u64,
    pub place: Place,
}

/// Where a region's memory lies as its owner sees it: host memory or one GPU. An initiator joins
/// the runs of several regions into one request only where each end's regions lie in one place,
/// since one transport request moves one place's memory; the target still checks every region it
/// is asked for, so a wrong place fails a request with a status, never moves a byte elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Place(u16);

impl Place {
    /// Host memory. A function, not an associated constant: cbindgen would put the constant in the
    /// C header.
    pub const fn host() -> Place {
        Place(0)
    }

    /// GPU `ordinal`; one beyond the field's range (none that CUDA numbers) shares the last code.
    pub fn gpu(ordinal: i32) -> Place {
        Place(u16::try_from(ordinal).map_or(u16::MAX, |n| n.saturating_add(1)))
    }
}

// c_char is i8 on some targets and u8 on others; going through native bytes works for both
// without a sign-changing cast.
fn char_to_byte(c: c_char) -> u8 {
    u8::from_ne_bytes(c.to_ne_bytes())
}

fn byte_to_char(b: u8) -> c_char {
    c_char::from_ne_bytes(b.to_ne_bytes())
}

impl Capability {
    fn to_padding(self) -> [c_char; PADDING_LEN] {
        let mut bytes = [0u8; PADDING_LEN];
        put_at(&mut bytes, 0, &self.region.to_le_bytes());
        put_at(&mut bytes, 8, &self.token.to_le_bytes());
        put_at(&mut bytes, 16, &CAP_MAGIC.to_le_bytes());
        put_at(&mut bytes, 20, &CAP_VERSION.to_le_bytes());
        put_at(&mut bytes, 22, &self.place.0.to_le_bytes());
        bytes.map(byte_to_char)
    }

    fn from_padding(padding: &[c_char; PADDING_LEN]) -> Result<Self, ProtoError> {
        let bytes = padding.map(char_to_byte);
        let mut r = Reader::new(&bytes, "FifoItem padding");
        let (region, token) = (r.u64()?, r.u64()?);
        let magic = r.u32()?;
        let version = r.u16()?;
        let place = Place(r.u16()?);
        // A zero tail leaves room for later versions and catches stray writes into it.
        let tail_is_zero = r.bytes(PADDING_LEN - CAP_LEN)?.iter().all(|&b| b == 0);
        r.finish()?;
        if magic == CAP_MAGIC && version == 2 && tail_is_zero {
            return Err(V2_ITEM);
        }
        if magic != CAP_MAGIC || version != CAP_VERSION || !tail_is_zero {
            return Err(FOREIGN_ITEM);
        }
        Ok(Capability { region, token, place })
    }
}

impl FifoItem {
    /// Field-wise little-endian at the `repr(C)` offsets.
    pub fn to_bytes(&self) -> [u8; FIFO_ITEM_SIZE] {
        let mut out = [0u8; FIFO_ITEM_SIZE];
        put_at(&mut out, offset_of!(Self, addr), &self.addr.to_le_bytes());
        put_at(&mut out, offset_of!(Self, size), &self.size.to_le_bytes());
        put_at(&mut out, offset_of!(Self, rkey), &self.rkey.to_le_bytes());
        put_at(&mut out, offset_of!(Self, nmsgs), &self.nmsgs.to_le_bytes());
        put_at(&mut out, offset_of!(Self, rid), &self.rid.to_le_bytes());
        put_at(&mut out, offset_of!(Self, idx), &self.idx.to_le_bytes());
        put_at(&mut out, offset_of!(Self, engine_offset), &self.engine_offset.to_le_bytes());
        put_at(&mut out, offset_of!(Self, padding), &self.padding.map(char_to_byte));
        out
    }

    pub fn from_bytes(b: &[u8; FIFO_ITEM_SIZE]) -> FifoItem {
        let padding: [u8; PADDING_LEN] = get_at(b, offset_of!(Self, padding));
        FifoItem {
            addr: u64::from_le_bytes(get_at(b, offset_of!(Self, addr))),
            size: u32::from_le_bytes(get_at(b, offset_of!(Self, size))),
            rkey: u32::from_le_bytes(get_at(b, offset_of!(Self, rkey))),
            nmsgs: u32::from_le_bytes(get_at(b, offset_of!(Self, nmsgs))),
            rid: u32::from_le_bytes(get_at(b, offset_of!(Self, rid))),
            idx: u64::from_le_bytes(get_at(b, offset_of!(Self, idx))),
            engine_offset: u32::from_le_bytes(get_at(b, offset_of!(Self, engine_offset))),
            padding: padding.map(byte_to_char),
        }
    }

    /// An item describing `size` bytes at `addr`, stamped with `cap` so the receiver can
    /// authorise the access; the transport-specific fields stay zero.
    #[doc(hidden)]
    pub fn with_capability(addr: u64, size: u32, cap: Capability) -> FifoItem {
        FifoItem { addr, size, padding: cap.to_padding(), ..FifoItem::default() }
    }

    /// Recovers the capability, refusing items this library did not produce; an item of the
    /// older layout is named as such, so a mixed deployment says what to upgrade.
    #[doc(hidden)]
    pub fn capability(&self) -> Result<Capability, ProtoError> {
        Capability::from_padding(&self.padding).map_err(|e| if self.is_version_1() { V1_ITEM } else { e })
    }

    fn is_version_1(&self) -> bool {
        let b = self.to_bytes();
        let magic = u32::from_le_bytes(get_at(&b, V1_MAGIC_AT));
        let version = u16::from_le_bytes(get_at(&b, V1_VERSION_AT));
        magic == CAP_MAGIC && version == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testutil::XorShift;

    fn cap() -> Capability {
        Capability { region: 0x0102_0304_0506_0708, token: 0xa1a2_a3a4_a5a6_a7a8, place: Place::gpu(2) }
    }

    fn sample() -> FifoItem {
        FifoItem {
            addr: 0x1122_3344_5566_7788,
            size: 0x99aa_bbcc,
            rkey: 1,
            nmsgs: 2,
            rid: 3,
            idx: 0xdead_beef_cafe_f00d,
            engine_offset: 0x7766_5544,
            padding: core::array::from_fn(|i| byte_to_char(u8::try_from(i).unwrap() + 0x80)),
        }
    }

    /// A version-1 item as the previous layout wrote it: the capability at bytes 32..54.
    fn version_1_bytes(addr: u64, size: u32, cap: Capability) -> [u8; FIFO_ITEM_SIZE] {
        let mut b = [0u8; FIFO_ITEM_SIZE];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&size.to_le_bytes());
        b[32..40].copy_from_slice(&cap.region.to_le_bytes());
        b[40..48].copy_from_slice(&cap.token.to_le_bytes());
        b[48..52].copy_from_slice(&CAP_MAGIC.to_le_bytes());
        b[52..54].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    #[test]
    fn layout_matches_uccl_with_engine_offset() {
        assert_eq!(size_of::<FifoItem>(), 64);
        assert_eq!(align_of::<FifoItem>(), 8);
        let offsets = [
            offset_of!(FifoItem, addr),
            offset_of!(FifoItem, size),
            offset_of!(FifoItem, rkey),
            offset_of!(FifoItem, nmsgs),
            offset_of!(FifoItem, rid),
            offset_of!(FifoItem, idx),
            offset_of!(FifoItem, engine_offset),
            offset_of!(FifoItem, padding),
        ];
        assert_eq!(offsets, [0, 8, 12, 16, 20, 24, 32, 36]);
        assert_eq!(size_of::<c_char>(), 1);
    }

    #[test]
    fn bytes_are_little_endian_at_struct_offsets() {
        let item = sample();
        let b = item.to_bytes();
        assert_eq!(&b[0..8], &item.addr.to_le_bytes());
        assert_eq!(&b[8..12], &[0xcc, 0xbb, 0xaa, 0x99]);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        assert_eq!(&b[16..20], &[2, 0, 0, 0]);
        assert_eq!(&b[20..24], &[3, 0, 0, 0]);
        assert_eq!(&b[24..32], &item.idx.to_le_bytes());
        assert_eq!(&b[32..36], &[0x44, 0x55, 0x66, 0x77]);
        let padding: Vec<u8> = (0x80..0x9c).collect();
        assert_eq!(&b[36..64], padding.as_slice());
        assert_eq!(FifoItem::from_bytes(&b), item);
    }

    #[test]
    fn capability_round_trips_and_leaves_other_fields_zero() {
        let item = FifoItem::with_capability(0x4000, 4096, cap());
        assert_eq!((item.addr, item.size), (0x4000, 4096));
        assert_eq!((item.rkey, item.nmsgs, item.rid, item.idx, item.engine_offset), (0, 0, 0, 0, 0));
        assert_eq!(item.capability(), Ok(cap()));
        let copied = FifoItem::from_bytes(&item.to_bytes());
        assert_eq!(copied.capability(), Ok(cap()));
    }

    #[test]
    fn capability_layout_is_exact() {
        let b = FifoItem::with_capability(0, 0, cap()).to_bytes();
        assert!(b[32..36].iter().all(|&x| x == 0), "engine_offset starts at zero");
        assert_eq!(&b[36..44], &cap().region.to_le_bytes());
        assert_eq!(&b[44..52], &cap().token.to_le_bytes());
        assert_eq!(&b[52..56], &[0x55, 0x54, 0x58, 0x31]);
        assert_eq!(&b[56..58], &[3, 0]);
        assert_eq!(&b[58..60], &[3, 0], "GPU 2");
        assert!(b[60..].iter().all(|&x| x == 0));
        let host = Capability { place: Place::host(), ..cap() };
        assert_eq!(&FifoItem::with_capability(0, 0, host).to_bytes()[58..60], &[0, 0]);
        assert_ne!(Place::gpu(0), Place::host());
    }

    #[test]
    fn engine_offset_is_ignored() {
        // UCCL's engine writes the chunk's engine index into every item it posts.
        for offset in [1, 3, 0xffff_ffff] {
            let mut item = FifoItem::with_capability(0x4000, 4096, cap());
            item.engine_offset = offset;
            assert_eq!(item.capability(), Ok(cap()), "engine_offset {offset:#x}");
            let mut b = item.to_bytes();
            b[32..36].copy_from_slice(&offset.to_le_bytes());
            assert_eq!(FifoItem::from_bytes(&b).capability(), Ok(cap()));
        }
    }

    #[test]
    fn version_1_items_are_refused_by_name() {
        let expected = "FifoItem was minted by an older uccl-tcpx (capability version 1, at bytes 32..54); this build \
                        reads version 3 at bytes 36..64: mint it again with prepare_fifo on an engine of this version";
        let v1 = FifoItem::from_bytes(&version_1_bytes(0x4000, 4096, cap()));
        assert_eq!(v1.capability(), Err(V1_ITEM));
        assert_eq!(v1.capability().unwrap_err().to_string(), expected);
        // UCCL's engine overwrites bytes 32..36 of a version-1 item (its region id); still named.
        let mut clobbered = v1;
        clobbered.engine_offset = 2;
        assert_eq!(clobbered.capability(), Err(V1_ITEM));
        // A version-1 item whose version field reads otherwise is simply foreign.
        let mut b = version_1_bytes(0x4000, 4096, cap());
        b[52] = 7;
        assert_eq!(FifoItem::from_bytes(&b).capability(), Err(FOREIGN_ITEM));
    }

    #[test]
    fn version_2_items_are_refused_by_name() {
        // Version 2: the same bytes up to 58, no place, zeros after.
        let mut b = FifoItem::with_capability(0x4000, 4096, Capability { place: Place::host(), ..cap() }).to_bytes();
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let err = FifoItem::from_bytes(&b).capability().unwrap_err();
        assert_eq!(err, V2_ITEM);
        assert!(err.to_string().contains("capability version 2"), "{err}");
    }

    #[test]
    fn current_items_never_read_as_version_1() {
        let mut rng = XorShift::new(0x5eed_0002);
        for i in 0..1000 {
            let place = if i % 2 == 0 { Place::host() } else { Place::gpu(i % 8) };
            let c = Capability { region: rng.next_u64(), token: rng.next_u64(), place };
            let item = FifoItem::with_capability(rng.next_u64(), 4096, c);
            assert!(!item.is_version_1());
            assert_eq!(item.capability(), Ok(c));
        }
    }

    #[test]
    fn items_not_minted_here_are_refused() {
        let expected = "FifoItem was not minted by uccl-tcpx prepare_fifo or is corrupted";
        assert_eq!(FifoItem::default().capability().unwrap_err().to_string(), expected);
        assert_eq!(sample().capability(), Err(FOREIGN_ITEM));
    }

    #[test]
    fn tampering_with_any_padding_bit_is_detected_or_changes_the_capability() {
        let item = FifoItem::with_capability(1, 2, cap());
        for byte in 0..PADDING_LEN {
            for bit in 0..8 {
                let mut bad = item;
                bad.padding[byte] = byte_to_char(char_to_byte(bad.padding[byte]) ^ (1 << bit));
                match bad.capability() {
                    Ok(c) => {
                        assert!(byte < 16 || (22..24).contains(&byte), "byte {byte} bit {bit} went unnoticed");
                        assert_ne!(c, cap());
                    }
                    Err(e) => {
                        assert!((16..22).contains(&byte) || byte >= 24);
                        // Flipping version 3 to 2 names the older version.
                        assert!(e == FOREIGN_ITEM || (byte == 20 && bit == 0 && e == V2_ITEM), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn fuzz_random_items_never_panic() {
        let mut rng = XorShift::new(0xf1f0_1234);
        let minted = FifoItem::with_capability(9, 9, cap()).to_bytes();
        let mut accepted = 0;
        for i in 0..10_000 {
            let bytes: [u8; FIFO_ITEM_SIZE] = if i % 2 == 0 {
                rng.bytes(FIFO_ITEM_SIZE).try_into().unwrap()
            } else {
                let mut b = rng.mutate(&minted);
                b.resize(FIFO_ITEM_SIZE, 0);
                b.try_into().unwrap()
            };
            let item = FifoItem::from_bytes(&bytes);
            assert_eq!(item.to_bytes(), bytes);
            if let Ok(c) = item.capability() {
                accepted += 1;
                assert_eq!(Capability::to_padding(c), item.padding);
            }
        }
        assert!(accepted > 0);
    }
}
