//! Hostile peers against an engine's listening ports, driven with plain `std::net::TcpStream`s:
//! garbage, foreign protocol versions, refused transports, silent and half-open connections,
//! connection floods, and a scripted fake peer that completes the handshake and then breaks the
//! control and data protocol. Every case must be refused or ignored without a crash, and a
//! connection between two real engines must keep moving verified data throughout.
//!
//! This binary runs the suite (`hostile/suite.rs`) on engines without a key; `hostile_auth.rs` runs
//! the same cases on engines that require one, the scripted peer then proving it first.
//!
//! The tests share one lock: they count the process's threads to prove that abandoned handshakes
//! release theirs, which only works while no other test of this file creates engines.

mod common;

/// No key: anyone who reaches the control port may connect.
const AUTH_KEY: Option<&[u8]> = None;

#[path = "hostile/suite.rs"]
mod suite;
