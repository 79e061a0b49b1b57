//! The hostile-peer suite (`hostile/suite.rs`, described in `hostile.rs`) against engines that
//! require a key: every case that reaches past the opening frames proves the key first, the rest
//! must be turned away exactly as without one.

mod common;

/// The key the engines under attack and the scripted peer share.
const AUTH_KEY: Option<&[u8]> = Some(b"hostile suite key, 32 bytes long");

#[path = "hostile/suite.rs"]
mod suite;
