//! Per-workload concurrency: how many connections one workload may have brokered at once.
//!
//! A workload here is a cgroup (by the kernel's cgroup id): the unit systemd services,
//! containers and pods each get, and what the kernel records for every connection without a
//! race. A uid would lump every root service together; a pid is too fine (a pool of worker
//! processes is one workload).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Counts open connections per cgroup id.
#[derive(Debug)]
pub struct PerWorkload {
    max: usize,
    open: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One admitted connection; its slot is given back on drop.
#[derive(Debug)]
pub struct Slot {
    cgroup_id: u64,
    open: Arc<Mutex<HashMap<u64, usize>>>,
}

impl PerWorkload {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more connection of `cgroup_id`, or `None` when it has `max` open.
    pub fn try_acquire(&self, cgroup_id: u64) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(cgroup_id).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            cgroup_id,
            open: self.open.clone(),
        })
    }

    /// Workloads with at least one open connection.
    pub fn workloads(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.cgroup_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.cgroup_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_gets_at_most_max_and_slots_come_back() {
        let limit = PerWorkload::new(2);
        let a1 = limit.try_acquire(7).unwrap();
        let _a2 = limit.try_acquire(7).unwrap();
        assert!(limit.try_acquire(7).is_none(), "third slot for workload 7");
        // Another workload is not affected.
        let _b = limit.try_acquire(8).unwrap();
        drop(a1);
        let _a3 = limit.try_acquire(7).expect("slot given back");
        assert_eq!(limit.workloads(), 2);
    }

    #[test]
    fn idle_workloads_are_forgotten() {
        let limit = PerWorkload::new(1);
        drop(limit.try_acquire(1).unwrap());
        assert_eq!(limit.workloads(), 0);
    }
}
