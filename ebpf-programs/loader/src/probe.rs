//! `pod_verify` through BPF_PROG_TEST_RUN: the kernel's verdict on a probe
//! packet, decided by the same code as the attached programs against the
//! live (pinned) maps, with nothing written (no conntrack entry, no event,
//! no counter). A handle of its own, loaded from the pins like `handles`,
//! so `palisade-agent verify` never waits for (or holds up) the agent.
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use palisade_common::{
    maps as names, programs, DIR_EGRESS, VERIFY_MARK_EGRESS, VERIFY_MARK_INGRESS,
};

use crate::{object, pins::Pins, sizes::MapSizes, tc::TC_ACT_OK, Error};

/// `struct __sk_buff`: 192 bytes on 6.x kernels; `mark` at byte 8 carries
/// the direction, `ifindex` at byte 40 the pod's host-side interface (the
/// kernel runs the program on that device, in the caller's netns).
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_IFINDEX_OFF: usize = 40;

pub struct Prober {
    /// Owns the program and the map references it holds.
    ebpf: Ebpf,
}

impl Prober {
    /// Loads `pod_verify` against the maps pinned under `pins` (the agent
    /// must have loaded the datapath there). `sizes` must be the sizes the
    /// maps were created with; nothing new is pinned.
    pub fn open(pins: &Pins, sizes: &MapSizes) -> Result<Self, Error> {
        let obj = object()?;
        pins.check_bpffs()?;
        for n in names::ALL {
            if !pins.map(n).exists() {
                return Err(Error::Unsupported(format!(
                    "verify: map {n} is not pinned under {} (is the agent's datapath loaded there?)",
                    pins.root().display()
                )));
            }
        }
        let paths: Vec<_> = names::ALL.iter().map(|n| (*n, pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(names::ENDPOINTS, sizes.endpoints)
            .map_max_entries(names::IPCACHE, sizes.ipcache)
            .map_max_entries(names::IPCACHE_EXACT, sizes.ipcache)
            .map_max_entries(names::POLICY, sizes.policy)
            .map_max_entries(names::POLICY_EXACT, sizes.policy)
            .map_max_entries(names::CONNTRACK, sizes.conntrack)
            .map_max_entries(names::FRAGMENTS, sizes.fragments)
            .map_max_entries(names::XDP_DENY, sizes.xdp_deny);
        let mut ebpf = loader.load(obj).map_err(Error::Load)?;
        let name = programs::POD_VERIFY;
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(Error::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        p.load().map_err(|source| Error::Program { name, source })?;
        crate::loader::load_tail_called(
            &mut ebpf,
            &[(programs::POD_VERIFY6, palisade_common::SLOT_VERIFY6)],
        )?;
        Ok(Self { ebpf })
    }

    /// The kernel's verdict (true = pass) on `frame` (an Ethernet frame) at
    /// the `dir` program of interface `ifindex`.
    pub fn verdict(&self, ifindex: u32, dir: u8, frame: &[u8]) -> Result<bool, Error> {
        let name = programs::POD_VERIFY;
        let p: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(Error::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let mark = if dir == DIR_EGRESS {
            VERIFY_MARK_EGRESS
        } else {
            VERIFY_MARK_INGRESS
        };
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        };
        let r = p
            .test_run(opts)
            .map_err(|source| Error::Program { name, source })?;
        Ok(r.return_value == TC_ACT_OK)
    }
}
