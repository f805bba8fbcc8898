//! Memory for secret bytes, kept out of swap and core dumps.
//!
//! Secrets are copied into slots of memory that was locked once: chunks of pages mapped
//! privately, `mlock`ed and marked `MADV_DONTDUMP`, carved into slots of one size class each
//! (16 B … 4 KiB). Taking a slot and giving it back (wiped) costs no system call, so a secret
//! cloned for every connection does not `mlock`/`munlock` heap pages per connection (that
//! split and merged the heap's mappings under the process-wide mmap lock). A secret larger
//! than the largest class gets a mapping of its own, locked, wiped and unmapped with it.
//!
//! Chunks are kept for the life of the process and reused: their number follows the most
//! secrets alive at once, not the number of connections. Locking is best effort: it fails
//! past `RLIMIT_MEMLOCK` without CAP_IPC_LOCK; the slots of a chunk that could not be locked
//! still serve, and each is counted in [`stats`] (exported as `latch_secret_mlock_failed`).
use std::{
    collections::HashSet,
    ptr::NonNull,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use zeroize::Zeroize as _;

/// Buffers placed in locked memory and in memory whose lock failed, since the process
/// started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MlockStats {
    pub locked: u64,
    pub failed: u64,
}

static LOCKED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Slot sizes: 16 << class.
const CLASSES: usize = 9;
const SMALLEST: usize = 16;
const LARGEST: usize = SMALLEST << (CLASSES - 1);
/// Bytes mapped per chunk (every class: 16 slots of the largest).
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Pool {
    /// Free slots per class, by address.
    free: [Vec<usize>; CLASSES],
    /// Chunks and dedicated mappings: (start, length, locked). Few: chunks follow the most
    /// secrets alive at once.
    regions: Vec<(usize, usize, bool)>,
    /// Slots and dedicated mappings in use, by address (what [`is_locked`] answers from).
    live: HashSet<usize>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Pool::default))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// Maps `len` bytes (a multiple of the page size), locks them and keeps them out of core
/// dumps. `None` when the mapping itself fails; `Some((addr, locked))` otherwise.
fn map_locked(len: usize) -> Option<(usize, bool)> {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the range is the mapping just made. Both calls only change how the kernel
    // treats its pages (residency, core dumps); a failure of either leaves it usable.
    let locked = unsafe {
        libc::madvise(addr, len, libc::MADV_DONTDUMP);
        libc::mlock(addr, len) == 0
    };
    Some((addr as usize, locked))
}

fn class_of(len: usize) -> usize {
    let size = len.max(SMALLEST).next_power_of_two();
    (size / SMALLEST).trailing_zeros() as usize
}

/// A buffer of secret bytes in locked memory (see the module's notes), wiped when dropped.
pub struct LockedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Where the bytes live: a slot of a class, or a mapping of their own (its length).
    home: Home,
}

#[derive(Clone, Copy)]
enum Home {
    Empty,
    Slot(usize),
    Mapping(usize),
}

// SAFETY: the buffer owns its slot exclusively and is never written after it is made; the
// pool's bookkeeping is behind a mutex.
unsafe impl Send for LockedBuf {}
// SAFETY: as above: shared access only reads.
unsafe impl Sync for LockedBuf {}

impl LockedBuf {
    /// A locked copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> LockedBuf {
        if bytes.is_empty() {
            return LockedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                home: Home::Empty,
            };
        }
        let (addr, home, locked) = if bytes.len() > LARGEST {
            let len = bytes.len().div_ceil(page_size()) * page_size();
            match map_locked(len) {
                Some((addr, locked)) => {
                    with_pool(|p| {
                        p.live.insert(addr);
                        p.regions.push((addr, len, locked));
                    });
                    (addr, Home::Mapping(len), locked)
                }
                None => alloc_failed(bytes.len()),
            }
        } else {
            let class = class_of(bytes.len());
            match with_pool(|p| p.take(class)) {
                Some((addr, locked)) => (addr, Home::Slot(class), locked),
                None => alloc_failed(bytes.len()),
            }
        };
        if locked {
            LOCKED.fetch_add(1, Ordering::Relaxed);
        } else {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: `addr` is a slot or mapping of at least `bytes.len()` writable bytes that
        // this buffer alone owns; the two ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len());
        }
        LockedBuf {
            // SAFETY: a mapping's address is never null.
            ptr: unsafe { NonNull::new_unchecked(addr as *mut u8) },
            len: bytes.len(),
            home,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised bytes owned by this buffer (dangling with
        // len 0 for an empty one, which a slice allows).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

fn alloc_failed(len: usize) -> ! {
    std::alloc::handle_alloc_error(
        std::alloc::Layout::array::<u8>(len).unwrap_or(std::alloc::Layout::new::<u8>()),
    )
}

impl Drop for LockedBuf {
    fn drop(&mut self) {
        let addr = self.ptr.as_ptr() as usize;
        let span = match self.home {
            Home::Empty => return,
            Home::Slot(class) => SMALLEST << class,
            Home::Mapping(len) => len,
        };
        // SAFETY: the whole slot or mapping belongs to this buffer until given back below.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), span) }.zeroize();
        match self.home {
            Home::Empty => {}
            Home::Slot(class) => with_pool(|p| p.give_back(class, addr)),
            Home::Mapping(len) => {
                with_pool(|p| {
                    p.live.remove(&addr);
                    p.regions.retain(|r| r.0 != addr);
                });
                // SAFETY: the mapping was made for this buffer alone and nothing refers to
                // it any more; unmapping also unlocks it.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

impl Pool {
    /// A free slot of `class` (a new chunk when none is free), with whether it is locked.
    fn take(&mut self, class: usize) -> Option<(usize, bool)> {
        if self.free[class].is_empty() {
            let (start, locked) = map_locked(CHUNK)?;
            self.regions.push((start, CHUNK, locked));
            let size = SMALLEST << class;
            // Lowest addresses last, so they are taken first.
            self.free[class].extend((0..CHUNK / size).rev().map(|i| start + i * size));
        }
        let addr = self.free[class].pop()?;
        self.live.insert(addr);
        Some((addr, self.region_locked(addr)))
    }

    fn give_back(&mut self, class: usize, addr: usize) {
        if self.live.remove(&addr) {
            self.free[class].push(addr);
        }
    }

    fn region_locked(&self, addr: usize) -> bool {
        self.regions
            .iter()
            .any(|&(start, len, locked)| locked && (start..start + len).contains(&addr))
    }
}

pub fn stats() -> MlockStats {
    MlockStats {
        locked: LOCKED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// Whether a live secret buffer starts at `ptr` and its memory is locked.
pub fn is_locked(ptr: *const u8) -> bool {
    let addr = ptr as usize;
    with_pool(|p| p.live.contains(&addr) && p.region_locked(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fit_the_length() {
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(16), 0);
        assert_eq!(class_of(17), 1);
        assert_eq!(SMALLEST << class_of(LARGEST), LARGEST);
        for len in [1, 15, 16, 17, 100, 255, 256, 1000, LARGEST] {
            assert!(SMALLEST << class_of(len) >= len, "{len}");
        }
    }

    /// A slot given back is wiped and taken again: steady use maps no new memory (other
    /// tests running at the same time may add a chunk or two, not thousands).
    #[test]
    fn slots_are_wiped_and_reused() {
        let a = LockedBuf::copy_of(b"first-zqxv-value");
        let addr = a.as_bytes().as_ptr();
        drop(a);
        // SAFETY: the slot stays mapped for the life of the process; it is read only to
        // check that the secret was wiped (another thread may have taken it since).
        let now = unsafe { std::slice::from_raw_parts(addr, 32) };
        assert!(!now.windows(4).any(|w| w == b"zqxv"), "slot not wiped");
        let regions = with_pool(|p| p.regions.len());
        for _ in 0..10_000 {
            let b = LockedBuf::copy_of(b"another-secret-value");
            assert_eq!(b.as_bytes(), b"another-secret-value");
        }
        assert!(with_pool(|p| p.regions.len()) <= regions + 2);
    }

    #[test]
    fn locked_memory_shows_in_the_kernel() {
        let buf = LockedBuf::copy_of(&[7u8; 100]);
        if is_locked(buf.as_bytes().as_ptr()) {
            let kb = std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap();
            assert!(kb >= (CHUNK / 1024) as u64, "VmLck {kb} kB");
        } else {
            assert!(stats().failed > 0);
        }
    }

    #[test]
    fn large_secrets_get_a_mapping_of_their_own() {
        let value = vec![b'k'; LARGEST * 3];
        let buf = LockedBuf::copy_of(&value);
        assert_eq!(buf.as_bytes(), &value[..]);
        let addr = buf.as_bytes().as_ptr();
        assert_eq!(addr as usize % page_size(), 0);
        let locked = is_locked(addr);
        assert!(locked || stats().failed > 0);
        drop(buf);
        assert!(!is_locked(addr));
    }
}
