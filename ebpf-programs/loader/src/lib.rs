//! Userspace side of palisade's datapath. `loader` alone touches the
//! `aya::Ebpf` object: it loads the programs (reusing pinned maps, so a
//! restarted agent adopts the live state), attaches them to pod veths
//! through pinned TCX links, and hands out typed maps (`maps`) and the
//! verdict event stream (`events`).

pub mod events;
pub mod loader;
pub mod maps;
pub mod packet;
pub mod pins;
pub mod reference;
pub mod state;
pub mod testrun;

pub use loader::{Datapath, DatapathConfig};
pub use maps::{Counters, Maps};
pub use pins::Pins;
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
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
