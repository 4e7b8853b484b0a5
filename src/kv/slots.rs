//! The pool of sequence slots of a host KV store: which slot ids are in use.
//!
//! A slot is one sequence's place in the store (its strips in every layer). A store starts with
//! every slot in use (the lockstep batch); a serving engine releases a finished request's slot
//! and acquires one for a new request. Ids are reused lowest first, so a pool that only ever
//! releases its highest slots keeps its active slots a prefix `0..n` (what the layer-wide
//! kernels need, see `KvStore::lockstep_slots`).

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub(super) struct SlotPool {
    active: Vec<bool>,
}

impl SlotPool {
    /// `capacity` slots, all in use.
    pub(super) fn full(capacity: usize) -> SlotPool {
        SlotPool {
            active: vec![true; capacity],
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.active.len()
    }

    pub(super) fn is_active(&self, slot: usize) -> bool {
        self.active.get(slot).copied().unwrap_or(false)
    }

    /// The slots in use, ascending.
    pub(super) fn active(&self) -> Vec<usize> {
        (0..self.active.len()).filter(|&s| self.active[s]).collect()
    }

    /// Checks that `slot` exists and is in use.
    pub(super) fn check(&self, slot: usize) -> Result<()> {
        crate::ensure!(
            slot < self.capacity(),
            "slot {slot} out of range: the store has {} slots (its batch)",
            self.capacity()
        );
        crate::ensure!(self.active[slot], "slot {slot} is free: add_slot() first");
        Ok(())
    }

    /// Takes the lowest free slot id.
    pub(super) fn acquire(&mut self) -> Result<usize> {
        let Some(slot) = self.active.iter().position(|&a| !a) else {
            return Err(Error::Capacity(format!(
                "no free slot: all {} slots of the store are in use (release one first)",
                self.capacity()
            )));
        };
        self.active[slot] = true;
        Ok(slot)
    }

    /// Marks `slot` free (checked in use by the caller).
    pub(super) fn release(&mut self, slot: usize) {
        self.active[slot] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_lowest_first() {
        let mut pool = SlotPool::full(3);
        assert!(pool.acquire().is_err(), "a full pool has no free slot");
        pool.release(1);
        pool.release(0);
        assert_eq!(pool.active(), vec![2]);
        assert!(pool.check(0).is_err() && pool.check(3).is_err() && pool.check(2).is_ok());
        assert_eq!(pool.acquire().unwrap(), 0);
        assert_eq!(pool.acquire().unwrap(), 1);
    }
}
