//! What a net plugin's vendor requires beyond the ncclNet v7 ABI, as one value the driver reads
//! (aws-ofi-nccl keeps its platform rules the same way, over one generic driver): TCPX's is
//! `tcpx::PROFILE`, TCPXO's `tcpxo::PROFILE`. The loaded table's name picks it before the
//! plugin's `init` (`loader::profile_of`).

use std::ops::Range;

pub struct Profile {
    /// What errors and logs call the plugin.
    pub vendor: &'static str,
    /// Two ends on one host can connect over the plugin (`Caps::reaches_own_host`).
    pub reaches_own_host: bool,
    /// A listen comm serves only one accept, so each channel listens on its own
    /// (`Caps::listen_per_channel`).
    pub listen_per_channel: bool,
    /// Comms bind to the GPU current when they are made, where a CUDA driver and a CUDA-capable
    /// device exist (`Caps::binds_gpu`).
    pub binds_gpu: bool,
    /// Requests per comm, received-but-unconsumed included; every device reports at most this.
    pub max_requests: usize,
    /// Bytes of a listen handle where `connect` keeps its in-progress state: never shipped to a
    /// peer, and zeroed in a fresh attempt's copy.
    pub connect_state: Range<usize>,
    /// Sets the plugin's environment defaults before its `init` (under the loader's lock), through
    /// [`set_missing`].
    pub set_environment: fn(),
    /// Received requests go back to the plugin with `irecvConsumed` (TCPX reuses their pool slots);
    /// otherwise the table may leave it NULL and it is never called.
    pub consumes_receives: bool,
    /// Requests may name host memory (a HOST `ptrSupport` bit alone does not promise it).
    pub host_requests: bool,
    /// A second `init` of one loaded image fails, so an image another consumer of the process
    /// (NCCL) initialised is not used: the loader makes a private one. Otherwise `init` is shared.
    pub init_once_per_image: bool,
    /// A failed `init` ends the process: the plugin is loaded only when asked for by name
    /// (`UCCL_TCPX_TRANSPORT`), never by `auto`, after the checks the engine can make itself.
    pub init_is_fatal: bool,
    /// Library names tried before NCCL's (`libnccl-net.so`) when none is configured.
    pub libraries: &'static [&'static str],
    /// What both ends must agree on beyond the plugin's name, from the environment the plugin's
    /// `init` read ([`agreement`]); empty where nothing.
    pub agreement: fn(Lookup<'_>) -> String,
}

/// The environment as a profile reads it: a variable's value, where set.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Nothing beyond the name.
pub fn nothing(_: Lookup<'_>) -> String {
    String::new()
}

/// `profile`'s agreement with the live environment: read right after the plugin's `init`, which
/// reads the same variables once.
pub fn agreement(profile: &Profile) -> String {
    (profile.agreement)(&|n: &str| std::env::var_os(n).map(|v| v.to_string_lossy().into_owned()))
}

/// Sets each `(variable, value, why)` that `defaults`, given the environment to look in, finds
/// unset. Plugins read their configuration only from the environment, once, in the `init` that
/// follows, so a deployment's own settings always win and these fill in the rest.
pub fn set_missing(
    defaults: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> Vec<(&'static str, &'static str, &'static str)>,
) {
    let lookup = |n: &str| std::env::var_os(n).map(|v| v.to_string_lossy().into_owned());
    for (name, value, why) in defaults(&lookup) {
        log::info!("net plugin: {name}={value} by default ({why}); set it to override");
        // SAFETY: setenv is not safe against concurrent getenv in other threads, and no code path
        // can promise that none run here (the host application, earlier engines). The plugin reads
        // its configuration only from the environment, once, in the `init` that follows, so there
        // is no other way to configure it; this runs once per process under the loader lock, and
        // our own threads do not read these variables.
        unsafe { std::env::set_var(name, value) };
    }
}
