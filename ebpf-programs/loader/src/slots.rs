//! `ENDPOINT_SLOTS`: the programs' fast index of `ENDPOINTS` by interface
//! (`palisade_common::EndpointSlot`). `ENDPOINTS` stays the truth; a slot
//! only ever holds a copy of an interface's entry there, written after it
//! and cleared before it goes, so a slot that is empty, another
//! interface's or caught mid-write costs a packet the hash lookup and
//! nothing else.
use aya::maps::{Array, MapData, MapError};
use palisade_common::{endpoint_slot, maps as names, EndpointInfo, EndpointSlot};

use crate::Error;

pub(crate) struct EndpointSlots {
    map: Array<MapData, EndpointSlot>,
}

/// The three whole-value writes that move a slot from `cur` to holding
/// `next` (`None`: empty), each changing either `seq` or the rest, never
/// both: `seq` made odd, the content, `seq` made even (see
/// `EndpointSlot`). A reader that copied the slot between two of them sees
/// an odd `seq` or a changed one, and goes to the hash.
pub(crate) fn writes(cur: EndpointSlot, next: Option<(u32, EndpointInfo)>) -> [EndpointSlot; 3] {
    // An odd `seq` left by a write that never finished is the "odd" step.
    let odd = cur.seq | 1;
    let (ifindex, info) = next.unwrap_or_default();
    [
        EndpointSlot { seq: odd, ..cur },
        EndpointSlot {
            seq: odd,
            ifindex,
            info,
        },
        EndpointSlot {
            seq: odd.wrapping_add(1),
            ifindex,
            info,
        },
    ]
}

/// Whether the slot holds `ifindex`'s entry as `info`, finished.
fn holds(s: &EndpointSlot, ifindex: u32, info: &EndpointInfo) -> bool {
    s.seq & 1 == 0 && s.ifindex == ifindex && s.info == *info
}

/// Slots are written only where stores and loads are each seen in order
/// (x86-64's TSO); elsewhere they stay empty and the programs use the hash.
const ENABLED: bool = cfg!(target_arch = "x86_64");

impl EndpointSlots {
    pub(crate) fn new(map: Array<MapData, EndpointSlot>) -> Self {
        Self { map }
    }

    fn get(&self, ifindex: u32) -> Result<EndpointSlot, Error> {
        self.map.get(&endpoint_slot(ifindex), 0).map_err(map_err)
    }

    /// Moves slot `index` from `cur` to `next` (`writes`).
    fn write(
        &mut self,
        index: u32,
        cur: EndpointSlot,
        next: Option<(u32, EndpointInfo)>,
    ) -> Result<(), Error> {
        for w in writes(cur, next) {
            self.map.set(index, w, 0).map_err(map_err)?;
        }
        Ok(())
    }

    #[cfg(feature = "test-utils")]
    pub(crate) fn raw(&self, ifindex: u32) -> Result<EndpointSlot, Error> {
        self.get(ifindex)
    }

    #[cfg(feature = "test-utils")]
    pub(crate) fn write_raw(&mut self, ifindex: u32, slot: EndpointSlot) -> Result<(), Error> {
        self.map
            .set(endpoint_slot(ifindex), slot, 0)
            .map_err(map_err)
    }

    /// After `ENDPOINTS` holds `info` for `ifindex`: the slot holds it too,
    /// unless another live interface has the slot (that one keeps it).
    pub(crate) fn set(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Error> {
        if !ENABLED {
            return Ok(());
        }
        let cur = self.get(ifindex)?;
        if holds(&cur, ifindex, &info) || (cur.ifindex != 0 && cur.ifindex != ifindex) {
            return Ok(());
        }
        self.write(endpoint_slot(ifindex), cur, Some((ifindex, info)))
    }

    /// Before `ifindex` leaves `ENDPOINTS`: its slot is emptied.
    pub(crate) fn clear(&mut self, ifindex: u32) -> Result<(), Error> {
        let cur = self.get(ifindex)?;
        if cur.ifindex != ifindex {
            return Ok(());
        }
        self.write(endpoint_slot(ifindex), cur, None)
    }

    /// Every slot made to agree with `ENDPOINTS` (`entries`: its interface
    /// entries): after a restart, an upgrade that created the map, or a
    /// crash between the two writes.
    pub(crate) fn resync(&mut self, entries: &[(u32, EndpointInfo)]) -> Result<(), Error> {
        let live: std::collections::HashMap<u32, EndpointInfo> = entries.iter().copied().collect();
        for i in 0..palisade_common::sizes::ENDPOINT_SLOTS {
            let cur = self.map.get(&i, 0).map_err(map_err)?;
            let keep =
                cur.seq & 1 == 0 && (cur.ifindex == 0 || live.get(&cur.ifindex) == Some(&cur.info));
            if !keep {
                self.write(i, cur, None)?;
            }
        }
        for (ifindex, info) in entries {
            self.set(*ifindex, *info)?;
        }
        Ok(())
    }
}

fn map_err(source: MapError) -> Error {
    Error::Map {
        name: names::ENDPOINT_SLOTS,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(generation: u32) -> EndpointInfo {
        EndpointInfo {
            endpoint_id: 3,
            generation,
            ..Default::default()
        }
    }

    /// What a reader copying the slot between any two writes gets.
    fn read(s: &EndpointSlot, ifindex: u32) -> Option<EndpointInfo> {
        // SAFETY: a valid slot.
        unsafe { palisade_common::slot_read(s, ifindex) }
    }

    #[test]
    fn each_write_changes_seq_or_content_and_only_the_last_is_readable() {
        let empty = EndpointSlot::default();
        let first = writes(empty, Some((7, info(1))));
        let second = writes(first[2], Some((7, info(2))));
        let gone = writes(second[2], None);
        let mut before = empty;
        for w in first.iter().chain(&second).chain(&gone) {
            let seq_changed = w.seq != before.seq;
            let rest_changed = w.ifindex != before.ifindex || w.info != before.info;
            assert!(!(seq_changed && rest_changed), "{before:?} -> {w:?}");
            before = *w;
        }
        for (steps, want) in [(first, info(1)), (second, info(2))] {
            assert_eq!(read(&steps[0], 7), None);
            assert_eq!(read(&steps[1], 7), None);
            assert_eq!(read(&steps[2], 7), Some(want));
            assert_eq!(read(&steps[2], 7 + 16 * 1024), None, "another interface's");
        }
        assert_eq!(read(&gone[2], 7), None);
        assert_eq!(gone[2].ifindex, 0);
        // A seq never repeats a readable value across updates.
        assert!(first[2].seq < second[2].seq && second[2].seq < gone[2].seq);
    }

    #[test]
    fn a_write_left_half_done_is_finished_by_the_next() {
        let stuck = writes(EndpointSlot::default(), Some((7, info(1))))[1];
        assert_eq!(read(&stuck, 7), None);
        let w = writes(stuck, Some((7, info(2))));
        assert_eq!(w[0].seq, stuck.seq, "still odd: no reader takes it");
        assert_eq!(read(&w[2], 7), Some(info(2)));
    }
}
