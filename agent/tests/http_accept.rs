//! `http::serve` out of file descriptors: accepting fails with EMFILE, and
//! the accept loop must back off (not spin on a listener that stays
//! readable), then serve again once descriptors are free. A test binary of
//! its own because it lowers RLIMIT_NOFILE for the whole process.
use std::{
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use palisade_agent::{
    http::{serve, HttpState},
    metrics::{KernelStats, Metrics},
};
use tokio::sync::watch;

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: libc::rlimit) {
    // SAFETY: setrlimit reads `r`.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

fn healthz(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn out_of_descriptors_backs_off_then_serves_again() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (_ready_tx, ready) = watch::channel(true);
    let state = HttpState {
        ready,
        metrics: Arc::new(Metrics::default()),
        kernel: Arc::new(KernelStats::default),
    };
    rt.spawn(serve(listener, state, std::future::pending()));
    assert!(healthz(TcpStream::connect(addr).unwrap()).starts_with("HTTP/1.1 200"));

    // Few descriptors left, then none: fill them with /dev/null.
    let saved = nofile();
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    set_nofile(libc::rlimit {
        rlim_cur: highest + 32,
        rlim_max: saved.rlim_max,
    });
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }
    // One descriptor for the client; the server's accept then has none.
    filler.pop();
    let client = TcpStream::connect(addr).unwrap();
    let c = client.try_clone();
    assert!(c.is_err(), "no descriptor should be left");

    let cpu0 = cpu_time();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let spent = cpu_time() - cpu0;
    // A loop retrying accept at once would burn a core for the whole time.
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in {:?} while out of descriptors",
        wall.elapsed()
    );

    drop(filler);
    set_nofile(saved);
    let t = Instant::now();
    let answer = healthz(client);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // axum retries after a second.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    rt.shutdown_timeout(Duration::from_secs(1));
}
