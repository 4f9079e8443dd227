//! BPF_PROG_TEST_RUN for the tc programs: crafted packets in, verdict out.
//! Used by the verdict and differential tests and the benchmarks (feature
//! `test-utils`).
use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

pub use crate::tc::{TC_ACT_OK, TC_ACT_SHOT};
use crate::Error;

/// `struct __sk_buff` is 192 bytes on 6.x kernels; only `ifindex` (byte 40)
/// is set: the kernel runs the program on that device (1 = loopback).
const SKB_CTX_LEN: usize = 192;
const SKB_IFINDEX_OFF: usize = 40;

pub struct RunResult {
    pub action: u32,
    /// Mean time per run, as measured by the kernel.
    pub per_run: Duration,
}

/// One run; the verdict and the packet as the program left it (rewrites).
pub fn run_tc_out(
    prog: &SchedClassifier,
    packet: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>), Error> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    };
    let r = prog.test_run(opts).map_err(|source| Error::Program {
        name: "test_run",
        source,
    })?;
    out.truncate(packet.len());
    Ok((r.return_value, out))
}

pub fn run_tc(
    prog: &SchedClassifier,
    packet: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<RunResult, Error> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: repeat.max(1),
        ..Default::default()
    };
    let r = prog.test_run(opts).map_err(|source| Error::Program {
        name: "test_run",
        source,
    })?;
    Ok(RunResult {
        action: r.return_value,
        per_run: r.duration,
    })
}
