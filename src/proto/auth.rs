//! Authentication of peers that share a key: the three handshake messages that come before Hello
//! when the connecting engine has a key, and what both ends derive from the key and the two
//! challenges. Pure: the caller supplies the randomness and does the I/O.
//!
//! ```text
//! connector                                   acceptor
//!   AuthHello { c }              ->
//!                                <-   AuthChallenge { a, HMAC(K, "acceptor" | c | a) }
//!   (checks the acceptor's proof)
//!   AuthProof { HMAC(K, "connector" | c | a) } ->
//!   Hello ...                    ->   (checks the proof before reading the Hello)
//! ```
//!
//! Each side proves the key over a challenge the other picked fresh, so a recorded exchange proves
//! nothing later, and the two proofs carry different labels, so neither side can be made to compute
//! the other's. Both ends then derive a connection secret, `HMAC(K, "connection" | c | a)`, that never
//! crosses the wire: it binds region tokens and channel hellos to this one connection.
//!
//! HMAC-SHA256 comes from RustCrypto's `hmac` and `sha2`: maintained, widely audited crates,
//! constant-time tag comparison (`verify_slice`), and SHA-NI on CPUs that have it.

use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ProtoError;
use super::wire::{Reader, Writer};

type HmacSha256 = Hmac<Sha256>;

pub(crate) const CHALLENGE_LEN: usize = 32;
pub(crate) const PROOF_LEN: usize = 32;
/// Keys shorter than this are refused: 16 random bytes are 128 bits, the least a shared secret
/// guarding memory should have.
pub(crate) const MIN_KEY_LEN: usize = 16;
/// A key file longer than this is a mistake (a wrong path), not a key.
pub(crate) const MAX_KEY_LEN: usize = 4096;

const ACCEPTOR_LABEL: &[u8] = b"uccl-tcpx v7 acceptor proof";
const CONNECTOR_LABEL: &[u8] = b"uccl-tcpx v7 connector proof";
const SECRET_LABEL: &[u8] = b"uccl-tcpx v7 connection secret";
const TOKEN_LABEL: &[u8] = b"region token";
const CHANNEL_LABEL: &[u8] = b"channel hello";

pub type Challenge = [u8; CHALLENGE_LEN];
pub type Proof = [u8; PROOF_LEN];

/// The key peers share. Its bytes never appear in `Debug` output or error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Box<[u8]>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    /// `None` (with the reason) for a key shorter than [`MIN_KEY_LEN`] or longer than [`MAX_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Result<AuthKey, String> {
        if bytes.len() < MIN_KEY_LEN || bytes.len() > MAX_KEY_LEN {
            return Err(format!(
                "an authentication key of {} bytes; {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes are needed",
                bytes.len()
            ));
        }
        Ok(AuthKey(bytes.into()))
    }

    fn mac(&self, label: &[u8], connector: &Challenge, acceptor: &Challenge) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(connector);
        mac.update(acceptor);
        mac
    }

    /// What the acceptor sends in its AuthChallenge.
    #[doc(hidden)]
    pub fn acceptor_proof(&self, connector: &Challenge, acceptor: &Challenge) -> Proof {
        self.mac(ACCEPTOR_LABEL, connector, acceptor).finalize().into_bytes().into()
    }

    /// What the connector sends in its AuthProof.
    #[doc(hidden)]
    pub fn connector_proof(&self, connector: &Challenge, acceptor: &Challenge) -> Proof {
        self.mac(CONNECTOR_LABEL, connector, acceptor).finalize().into_bytes().into()
    }

    /// Checks the acceptor's proof in constant time.
    #[doc(hidden)]
    pub fn acceptor_proof_ok(&self, connector: &Challenge, acceptor: &Challenge, proof: &Proof) -> bool {
        self.mac(ACCEPTOR_LABEL, connector, acceptor).verify_slice(proof).is_ok()
    }

    /// Checks the connector's proof in constant time.
    #[doc(hidden)]
    pub fn connector_proof_ok(&self, connector: &Challenge, acceptor: &Challenge, proof: &Proof) -> bool {
        self.mac(CONNECTOR_LABEL, connector, acceptor).verify_slice(proof).is_ok()
    }

    /// The secret both ends of an authenticated connection share.
    #[doc(hidden)]
    pub fn session(&self, connector: &Challenge, acceptor: &Challenge) -> Session {
        Session { secret: self.mac(SECRET_LABEL, connector, acceptor).finalize().into_bytes().into() }
    }
}

/// What an authenticated connection knows that nobody without the key can compute.
#[derive(Clone)]
pub struct Session {
    secret: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session(..)")
    }
}

impl Session {
    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length")
    }

    /// The nonce this connection's ChannelHellos carry: a stranger who saw the Hello's nonce on the
    /// wire cannot forge a channel hello from it.
    pub fn channel_nonce(&self) -> u64 {
        let mut mac = self.mac();
        mac.update(CHANNEL_LABEL);
        first_u64(mac)
    }

    pub fn token_binding(&self) -> TokenBinding {
        let mut mac = self.mac();
        mac.update(TOKEN_LABEL);
        TokenBinding::new(mac)
    }
}

/// Turns a region's token into the value that stands for it on one connection. Requests carry the
/// bound value, never the token: seen on the wire, it is useless on any other connection, and it
/// reveals nothing of the token (HMAC is one-way).
pub struct TokenBinding {
    /// The HMAC state after the secret and the label, cloned per request: two SHA-256 blocks per use.
    keyed: HmacSha256,
    /// The last values bound, one slot per region id modulo [`MEMO_SLOTS`]: a call of blocks in any
    /// order over 160 regions binds each region's token once at each end, not once per run of
    /// blocks (8,192 runs cost about 1.5 ms more with a key than without, 2-core VM).
    memo: Mutex<Box<Memo>>,
}

/// Slots of a binding's memo: more than the regions serving stacks register (64-188), about 6 KiB
/// a connection.
const MEMO_SLOTS: usize = 256;

/// Per slot: a region, its token, and the value bound from them.
type Memo = [Option<(u64, u64, u64)>; MEMO_SLOTS];

impl TokenBinding {
    fn new(keyed: HmacSha256) -> TokenBinding {
        TokenBinding { keyed, memo: Mutex::new(Box::new([None; MEMO_SLOTS])) }
    }

    pub fn bind(&self, region: u64, token: u64) -> u64 {
        let slot = (region % MEMO_SLOTS as u64) as usize;
        if let Some((r, t, bound)) = self.memo()[slot]
            && (r, t) == (region, token)
        {
            return bound;
        }
        let mut mac = self.keyed.clone();
        mac.update(&region.to_le_bytes());
        mac.update(&token.to_le_bytes());
        let bound = first_u64(mac);
        self.memo()[slot] = Some((region, token, bound));
        bound
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Box<Memo>> {
        // Every slot holds a whole value or none: a panic elsewhere leaves nothing half-written.
        self.memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Clone for TokenBinding {
    fn clone(&self) -> TokenBinding {
        TokenBinding::new(self.keyed.clone())
    }
}

impl std::fmt::Debug for TokenBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenBinding(..)")
    }
}

fn first_u64(mac: HmacSha256) -> u64 {
    let tag = mac.finalize().into_bytes();
    u64::from_le_bytes(tag[..8].try_into().expect("a SHA-256 tag has 32 bytes"))
}

/// The connector's first frame when it has a key: its challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHello {
    pub challenge: Challenge,
}

/// The acceptor's answer: its own challenge, and its proof over both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthChallenge {
    pub challenge: Challenge,
    pub proof: Proof,
}

/// The connector's proof over both challenges; its Hello follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthProof {
    pub proof: Proof,
}

impl AuthHello {
    pub(super) fn write(&self, w: &mut Writer<'_>) {
        w.bytes(&self.challenge);
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self { challenge: r.array()? })
    }
}

impl AuthChallenge {
    pub(super) fn write(&self, w: &mut Writer<'_>) {
        w.bytes(&self.challenge);
        w.bytes(&self.proof);
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self { challenge: r.array()?, proof: r.array()? })
    }
}

impl AuthProof {
    pub(super) fn write(&self, w: &mut Writer<'_>) {
        w.bytes(&self.proof);
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self { proof: r.array()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> AuthKey {
        AuthKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn keys_need_sixteen_bytes_and_never_print() {
        assert!(AuthKey::new(&[1; 15]).unwrap_err().contains("15 bytes"));
        assert!(AuthKey::new(&[1; MAX_KEY_LEN + 1]).is_err());
        let k = AuthKey::new(b"0123456789abcdef").unwrap();
        assert_eq!(format!("{k:?}"), "AuthKey(16 bytes)");
        assert_eq!(format!("{:?}", k.session(&[0; 32], &[0; 32])), "Session(..)");
    }

    #[test]
    fn proofs_verify_only_with_the_same_key_challenges_and_role() {
        let (c, a) = ([1u8; 32], [2u8; 32]);
        let k = key(7);
        let acc = k.acceptor_proof(&c, &a);
        let con = k.connector_proof(&c, &a);
        assert!(k.acceptor_proof_ok(&c, &a, &acc));
        assert!(k.connector_proof_ok(&c, &a, &con));
        // A proof made for the other role, other challenges or another key is refused.
        assert!(!k.connector_proof_ok(&c, &a, &acc));
        assert!(!k.acceptor_proof_ok(&c, &a, &con));
        assert!(!k.acceptor_proof_ok(&a, &c, &acc));
        assert!(!key(8).acceptor_proof_ok(&c, &a, &acc));
        let mut flipped = acc;
        flipped[31] ^= 1;
        assert!(!k.acceptor_proof_ok(&c, &a, &flipped));
    }

    #[test]
    fn sessions_bind_tokens_per_connection() {
        let k = key(7);
        let one = k.session(&[1; 32], &[2; 32]);
        let same = k.session(&[1; 32], &[2; 32]);
        let other = k.session(&[1; 32], &[3; 32]);
        let (b1, b2) = (one.token_binding(), other.token_binding());
        assert_eq!(b1.bind(5, 99), same.token_binding().bind(5, 99), "both ends derive the same value");
        assert_ne!(b1.bind(5, 99), b2.bind(5, 99), "another connection binds the token differently");
        assert_ne!(b1.bind(5, 99), b1.bind(6, 99), "the region is bound too");
        assert_ne!(b1.bind(5, 99), b1.bind(5, 98));
        assert_ne!(b1.bind(5, 99), 99, "the token itself never stands for itself");
        assert_eq!(one.channel_nonce(), same.channel_nonce());
        assert_ne!(one.channel_nonce(), other.channel_nonce());
        assert_ne!(key(8).session(&[1; 32], &[2; 32]).channel_nonce(), one.channel_nonce());
    }

    /// The memo answers what the HMAC would: pairs that share a slot, region 0 with token 0 (an
    /// empty slot must not read as its value), the same pair again after others took its slot.
    #[test]
    fn remembered_bindings_are_the_bindings() {
        let session = key(9).session(&[4; 32], &[5; 32]);
        let (memo, fresh) = (session.token_binding(), || session.token_binding());
        let slots = MEMO_SLOTS as u64;
        let pairs = [(0, 0), (0, 1), (slots, 0), (1, 7), (1 + slots, 7), (1, 8), (2 * slots + 1, 7), (u64::MAX, 3)];
        for round in 0..3 {
            for &(region, token) in &pairs {
                assert_eq!(memo.bind(region, token), fresh().bind(region, token), "round {round}: {region}, {token}");
            }
        }
        assert_eq!(memo.clone().bind(1, 7), fresh().bind(1, 7), "a clone binds as the original");
    }

    /// Fixed vectors: both ends of a connection may run different builds, so the derivations must
    /// never change silently (RFC 4231 test case 2 checks the HMAC itself).
    #[test]
    fn derivations_are_pinned() {
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let k = key(7);
        let s = k.session(&[1; 32], &[2; 32]);
        let pinned = (s.token_binding().bind(5, 99), s.channel_nonce());
        assert_eq!(pinned, PINNED, "update PINNED only together with the protocol version");
    }

    const PINNED: (u64, u64) = (9_606_807_043_716_621_122, 13_257_218_797_256_544_517);
}
