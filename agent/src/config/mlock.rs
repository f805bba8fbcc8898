//! Keeping secret buffers out of swap: `mlock` with a per-page reference count.
//!
//! Page locks do not nest — one `munlock` unlocks a page however many secrets share it — so
//! pages are counted here and unlocked only when the last locked buffer on them goes. Locking
//! is best effort: it fails past `RLIMIT_MEMLOCK` without CAP_IPC_LOCK, and a failure only
//! counts in [`stats`] (exported as `latch_secret_mlock_failures`).
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Buffers locked and locks refused, since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MlockStats {
    pub locked: u64,
    pub failed: u64,
}

#[derive(Default)]
struct Table {
    /// page address → locked buffers on it.
    pages: HashMap<usize, u32>,
    /// start addresses of buffers whose lock succeeded.
    buffers: HashSet<usize>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);
static LOCKED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

fn pages(ptr: *const u8, len: usize) -> (usize, impl Iterator<Item = usize>) {
    let size = page_size();
    let first = ptr as usize & !(size - 1);
    let end = (ptr as usize + len).div_ceil(size) * size;
    (first, (first..end).step_by(size))
}

/// Locks the pages of `len` bytes at `ptr` (a heap buffer that does not move while locked).
pub fn lock(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let table = guard.get_or_insert_with(Table::default);
    // SAFETY: mlock only changes page residency; the range is memory this process owns.
    if unsafe { libc::mlock(ptr.cast(), len) } != 0 {
        FAILED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    table.buffers.insert(ptr as usize);
    for page in pages(ptr, len).1 {
        *table.pages.entry(page).or_insert(0) += 1;
    }
    LOCKED.fetch_add(1, Ordering::Relaxed);
}

/// Releases a buffer [`lock`]ed before (no-op if its lock had failed); pages no other locked
/// buffer uses are unlocked.
pub fn unlock(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(table) = guard.as_mut() else { return };
    if !table.buffers.remove(&(ptr as usize)) {
        return;
    }
    let size = page_size();
    for page in pages(ptr, len).1 {
        let last = match table.pages.get_mut(&page) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if last {
            table.pages.remove(&page);
            // SAFETY: munlock only changes page residency.
            unsafe { libc::munlock(page as *const libc::c_void, size) };
        }
    }
}

pub fn stats() -> MlockStats {
    MlockStats {
        locked: LOCKED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// Whether the buffer starting at `ptr` is locked now.
pub fn is_locked(ptr: *const u8) -> bool {
    let guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .is_some_and(|t| t.buffers.contains(&(ptr as usize)))
}

/// Pages locked for secrets now.
pub fn locked_pages() -> usize {
    let guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().map_or(0, |t| t.pages.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two buffers on one page: unlocking the first keeps the page locked for the second.
    #[test]
    fn shared_pages_stay_locked_until_the_last_buffer_goes() {
        let size = page_size();
        let buf = vec![0u8; 3 * size];
        // Two ranges inside the middle page.
        let mid = (buf.as_ptr() as usize).div_ceil(size) * size;
        let (a, b) = (mid as *const u8, (mid + 64) as *const u8);
        lock(a, 32);
        lock(b, 32);
        if !is_locked(a) {
            // RLIMIT_MEMLOCK reached without CAP_IPC_LOCK: nothing else to check.
            assert!(stats().failed > 0);
            return;
        }
        let count = |p: usize| {
            TABLE
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .pages
                .get(&p)
                .copied()
        };
        assert_eq!(count(mid), Some(2));
        unlock(a, 32);
        assert_eq!(count(mid), Some(1));
        assert!(is_locked(b));
        unlock(b, 32);
        assert_eq!(count(mid), None);
        // Unlocking again is a no-op.
        unlock(b, 32);
        assert_eq!(count(mid), None);
    }

    #[test]
    fn vmlck_grows_while_locked() {
        fn vmlck_kb() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        }
        let buf = vec![7u8; 64 * page_size()];
        lock(buf.as_ptr(), buf.len());
        if is_locked(buf.as_ptr()) {
            assert!(vmlck_kb() >= 64 * page_size() as u64 / 1024);
        }
        unlock(buf.as_ptr(), buf.len());
        assert!(!is_locked(buf.as_ptr()));
    }
}
