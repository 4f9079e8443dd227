//! BPF_PROG_TEST_RUN for the tc programs: crafted packets in, verdict out.
//! Used by the verdict and differential tests and the benchmarks (feature
//! `test-utils`).
use std::{path::Path, time::Duration};

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
    // The packet as the program left it: it may have grown or shrunk.
    out.truncate(r.data_size_out as usize);
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

/// The empty classifier (`r0 = TC_ACT_OK; exit`), loaded with a raw
/// bpf(2) call and pinned, then opened through aya so that it runs through
/// exactly the same `run_tc` as the policy programs (the benchmarks'
/// floor), or is attached as someone else's program (the attach-order test).
pub fn load_pass_all(dir: &Path) -> Result<SchedClassifier, Error> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        rest: [u8; 64],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        rest: [u8; 16],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    // mov64 r0, 0 ; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"bench_empty");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        rest: [0; 64],
    };
    // SAFETY: a valid bpf_attr prefix (zero tail) that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    let io = |what: &str, source| Error::Io {
        what: what.to_string(),
        source,
    };
    if fd < 0 {
        return Err(io(
            "loading the empty program",
            std::io::Error::last_os_error(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io("creating its pin directory", e))?;
    let path = dir.join("bench_empty");
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io("its pin path", std::io::Error::other(e)))?;
    let pin = ObjPin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
        rest: [0; 16],
    };
    // SAFETY: as above; the path string outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin as *const ObjPin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    let pin_err = std::io::Error::last_os_error();
    // SAFETY: we own this descriptor; the pin keeps the program.
    unsafe { libc::close(fd as i32) };
    if r != 0 {
        return Err(io("pinning the empty program", pin_err));
    }
    SchedClassifier::from_pin(&path).map_err(|source| Error::Program {
        name: "empty",
        source,
    })
}
