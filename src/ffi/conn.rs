//! Connection handles.

use std::ffi::c_int;
use std::sync::{Arc, Weak};

use super::ffi_fn;
use super::handle::HandleTable;
use crate::engine::{Connection, Engine};
use crate::error::Result;

/// A connection to one peer engine.
pub struct uccl_conn {
    _private: [u8; 0],
}
pub type uccl_conn_t = uccl_conn;

pub(crate) struct ConnEntry {
    pub conn: Arc<Connection>,
    pub engine: Weak<Engine>,
}

pub(crate) static CONNS: HandleTable<ConnEntry> = HandleTable::new("connection", 2);

pub(crate) fn conn_ref(conn: *const uccl_conn_t) -> Result<Arc<Connection>> {
    Ok(CONNS.get(conn)?.conn.clone())
}

/// Control messages are always served by the engine; this exists for UCCL compatibility and fails
/// (`-7`) when called twice on the same connection without `uccl_engine_stop_listener` between.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_start_listener(conn: *mut uccl_conn_t) -> c_int {
    ffi_fn!("uccl_engine_start_listener", {
        conn_ref(conn)?.start_listener()?;
        Ok(0)
    })
}

/// Lets a later `uccl_engine_start_listener` on this connection succeed again (UCCL allows that
/// restart). The connection keeps moving data and notifications meanwhile, and the engine keeps
/// accepting at the address of its metadata. 0 also when the listener was not started.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_stop_listener(conn: *mut uccl_conn_t) -> c_int {
    ffi_fn!("uccl_engine_stop_listener", {
        conn_ref(conn)?.stop_listener();
        Ok(0)
    })
}

/// Closes the connection: pending transfers fail, the peer is told. NULL is a no-op; the handle is
/// invalid afterwards.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_conn_destroy(conn: *mut uccl_conn_t) {
    ffi_fn!("uccl_engine_conn_destroy", {
        if conn.is_null() {
            return Ok(());
        }
        let entry = CONNS.remove(conn)?;
        match entry.engine.upgrade() {
            Some(engine) => engine.close_connection(&entry.conn),
            None => entry.conn.close(),
        }
        Ok(())
    })
}

/// Whether the peer engine runs on this host (same boot and network namespace, as both engines
/// announced in the handshake); false for an invalid handle, and for every connection of an engine
/// created with UCCL_TCPX_DISABLE_IPC=1 or whose peer was.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_conn_is_local(conn: *mut uccl_conn_t) -> bool {
    ffi_fn!("uccl_engine_conn_is_local", { Ok(conn_ref(conn)?.peer.locality.is_local()) })
}
