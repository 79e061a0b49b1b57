//! The connecting side of authentication (`proto::auth` has the exchange and the derivations; the
//! accepting side runs in `admission`, without a thread of its own). Before anything else, and
//! before this side opens a listener for the peer: AuthHello out, the acceptor's proof checked,
//! our proof back. A peer that cannot prove the key is told why and left.

use std::net::TcpStream;

use super::handshake::{read_frame, refuse, refused, send_frame};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::auth::{Challenge, Session};
use crate::proto::{AuthHello, AuthKey, AuthProof, Handshake};

/// Runs the connector's half of the challenge-response on `stream`; the session it returns binds
/// this connection's tokens and channel hellos.
pub fn authenticate(stream: &mut TcpStream, key: &AuthKey) -> Result<Session> {
    let ours = random_challenge()?;
    send_frame(stream, &Handshake::AuthHello(AuthHello { challenge: ours }))?;
    match read_frame(stream)? {
        Handshake::AuthChallenge(c) => {
            if !key.acceptor_proof_ok(&ours, &c.challenge, &c.proof) {
                return Err(refuse(
                    stream,
                    Error::not_allowed(
                        "authentication failed: the peer's proof does not match this engine's key (the two engines hold different keys)",
                    ),
                ));
            }
            let proof = key.connector_proof(&ours, &c.challenge);
            send_frame(stream, &Handshake::AuthProof(AuthProof { proof }))?;
            Ok(key.session(&ours, &c.challenge))
        }
        Handshake::Refuse(r) => Err(refused(r)),
        _ => Err(refuse(stream, Error::backend("protocol violation: expected an AuthChallenge"))),
    }
}

/// A fresh challenge from the kernel's CSPRNG: predictable challenges would let a recorded proof
/// be replayed.
pub fn random_challenge() -> Result<Challenge> {
    let mut out = [0u8; 32];
    let mut filled = 0;
    while filled < out.len() {
        // SAFETY: writes at most `out.len() - filled` bytes into the rest of `out`.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), out.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::new(UcclStatus::ErrInternal, format!("no randomness for a challenge: {err}")));
        }
        filled += n as usize;
    }
    Ok(out)
}
