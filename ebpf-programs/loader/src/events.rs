//! The verdict event stream: `FlowEvent` records from the ring buffer.
use std::{
    collections::VecDeque,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use palisade_common::{FlowEvent, FlowEvent4};

pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Events read while looking for another one, handed out first.
    backlog: VecDeque<FlowEvent>,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            backlog: VecDeque::new(),
        }
    }

    /// Everything queued now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out: Vec<FlowEvent> = self.backlog.drain(..).collect();
        while let Some(item) = self.ring.next() {
            // The IPv6 path writes a whole FlowEvent, the IPv4 path its
            // first 64 bytes (`FlowEvent4`): told apart by length.
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a whole FlowEvent (checked length);
                // read_unaligned because ring records are only 8-byte aligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
            } else if item.len() >= std::mem::size_of::<FlowEvent4>() {
                // SAFETY: as above, for a FlowEvent4.
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent4) };
                out.push(e.into());
            }
        }
        out
    }

    /// Block up to `timeout` for data; true when woken. The programs wake
    /// readers only once a backlog builds up, so drain after every wait,
    /// woken or not.
    pub fn wait(&self, timeout: Duration) -> bool {
        readable(self.ring.as_raw_fd(), timeout)
    }

    /// The first event for which `pred` holds, waiting up to `timeout`;
    /// the others stay queued for later calls.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&FlowEvent) -> bool,
    ) -> Option<FlowEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = self.drain();
            if let Some(i) = all.iter().position(&mut pred) {
                let hit = all.remove(i);
                self.backlog.extend(all);
                return Some(hit);
            }
            self.backlog.extend(all);
            let left = deadline.checked_duration_since(Instant::now())?;
            self.wait(left.min(Duration::from_millis(100)));
        }
    }

    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    pub fn into_inner(self) -> RingBuf<MapData> {
        self.ring
    }
}

/// Blocks up to `timeout` until `fd` is readable; whether it is.
pub(crate) fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    n > 0
}
