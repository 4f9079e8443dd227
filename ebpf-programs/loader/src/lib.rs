//! Userspace side of palisade's datapath. `loader` alone touches the
//! `aya::Ebpf` object: it loads the programs (reusing pinned maps, so a
//! restarted agent adopts the live state), attaches them to pod veths
//! through pinned TCX links, and hands out typed maps (`maps`) and the
//! verdict event stream (`events`). `handles` opens maps from their pins
//! on its own, for the conntrack GC and the counters behind /metrics.
//!
//! The `test-utils` feature adds what only tests and benchmarks use:
//! BPF_PROG_TEST_RUN (`testrun`) and raw conntrack/fragment access on
//! `Maps`. `packet` is not behind it: the reference evaluator (and so
//! `palisade-agent trace`) renders its frames.

pub mod dns;
pub mod events;
mod exact;
pub mod handles;
pub mod hooks;
pub mod loader;
mod local;
pub mod maps;
pub mod packet;
pub mod pins;
pub mod probe;
pub mod reference;
pub mod sizes;
mod slots;
pub mod state;
pub mod tc;
#[cfg(feature = "test-utils")]
pub mod testrun;
/// Without `test-utils`, only the verdict constants, at the path
/// `reference.rs` names them by.
#[cfg(not(feature = "test-utils"))]
mod testrun {
    pub use crate::tc::{TC_ACT_OK, TC_ACT_SHOT};
}

pub use handles::{ConntrackGc, GcPass, StatsReader};
pub use hooks::PodHook;
pub use loader::{Datapath, DatapathConfig};
pub use local::LocalDelivery;
pub use maps::{Counters, Maps};
pub use pins::Pins;
pub use sizes::MapSizes;
pub use state::MapState;

/// The eBPF object built by build.rs (empty when the toolchain was absent).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade"));

/// The embedded object, or an error that says how to get one.
pub fn object() -> Result<&'static [u8], Error> {
    if OBJECT.is_empty() {
        return Err(Error::ObjectMissing);
    }
    Ok(OBJECT)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the eBPF object was not built into this binary (eBPF toolchain absent at build time); \
         run `cargo xtask setup` and rebuild"
    )]
    ObjectMissing,
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name} is full ({entries} entries): the entry was not written")]
    MapFull { name: &'static str, entries: u32 },
    #[error("pin {path}")]
    Pin {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link {path}")]
    Link {
        path: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "pin root {root} is not on a bpf filesystem ({checked} is on filesystem type {fs_type:#x}): \
         mount bpffs (`mount -t bpf bpf /sys/fs/bpf`), do not start the agent under \
         `ip netns exec` (it mounts a fresh /sys without bpffs), or pass --pin-root \
         with a directory on a bpffs mount"
    )]
    NotBpffs {
        root: std::path::PathBuf,
        checked: std::path::PathBuf,
        fs_type: u32,
    },
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// A capability this dataplane does not have (yet); the message says which.
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
