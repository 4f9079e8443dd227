//! Pinned maps across an upgrade: a pin whose key or value size is not the
//! one this datapath's object gives the map (a layout changed) is replaced
//! by an empty map; every other pin is adopted with its contents.
use std::{ffi::CString, os::fd::FromRawFd};

use anyhow::{ensure, Context, Result};
use palisade_common::{maps as names, CtKey, CtValue, EndpointInfo};
use palisade_dataplane::{Datapath, DatapathConfig};
use palisade_tests::{require_root, PinRoot};

/// BPF_MAP_CREATE of an LRU hash with the given sizes, pinned at `path`
/// (as an older agent would have left it).
fn pin_lru_hash(path: &std::path::Path, key: u32, value: u32) -> Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let mut attr = [0u8; 128];
    for (off, v) in [(0, BPF_MAP_TYPE_LRU_HASH), (4, key), (8, value), (12, 64)] {
        attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: a valid bpf_attr buffer of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned; closed on drop.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let p = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    // SAFETY: as above; `p` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    ensure!(r == 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    Ok(())
}

fn sizes(path: &std::path::Path) -> Result<(u32, u32)> {
    let info = aya::maps::MapInfo::from_pin(path).context("reading the pinned map")?;
    Ok((info.key_size(), info.value_size()))
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_and_the_rest_adopted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let root = PinRoot::new()?;
    let cfg = DatapathConfig {
        pins: root.pins.clone(),
        ..Default::default()
    };
    let ep = EndpointInfo {
        endpoint_id: 7,
        identity: 1001,
        ipv4: u32::from_ne_bytes([10, 9, 0, 2]),
        ..Default::default()
    };
    {
        let mut dp = Datapath::load(&cfg)?;
        dp.take_maps()?.upsert_endpoint(42, ep)?;
    }
    // An older agent's conntrack: values of 24 bytes.
    let ct = root.pins.map(names::CONNTRACK);
    std::fs::remove_file(&ct)?;
    let key = std::mem::size_of::<CtKey>() as u32;
    pin_lru_hash(&ct, key, 24)?;
    ensure!(sizes(&ct)? == (key, 24));

    let mut dp = Datapath::load(&cfg).context("loading over the old conntrack pin")?;
    let want = (key, std::mem::size_of::<CtValue>() as u32);
    ensure!(
        sizes(&ct)? == want,
        "conntrack pin not replaced: {:?}",
        sizes(&ct)?
    );
    let maps = dp.take_maps()?;
    ensure!(
        maps.endpoint(42) == Some(ep),
        "the endpoints map was not adopted with its entry"
    );
    Ok(())
}
