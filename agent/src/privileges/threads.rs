//! Dropping capabilities in every thread of the process, not only the caller's.
//!
//! capset(2) and `PR_CAPBSET_DROP` act on the calling thread alone. Each other thread is sent a
//! real-time signal whose handler makes those system calls itself (only async-signal-safe
//! ones), then reports back; the caller waits for every report and then checks each thread's
//! `/proc/self/task/<tid>/status`. A thread created meanwhile inherits its creator's sets, so
//! the check repeats until every thread shows the target.
use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// The target, read by the signal handler.
static EFFECTIVE: AtomicU64 = AtomicU64::new(0);
static SHRINK_BOUNDING: AtomicBool = AtomicBool::new(false);
/// Threads that have run the handler.
static DONE: AtomicUsize = AtomicUsize::new(0);
/// Handler failures (a system call that returned an error).
static FAILED: AtomicUsize = AtomicUsize::new(0);

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Capabilities the kernel knows (CAP_CHECKPOINT_RESTORE is 40).
const CAP_LAST: u32 = 63;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops the calling thread's capabilities to `mask` (effective = permitted = `mask`,
/// inheritable and ambient cleared, and the bounding set shrunk to `mask` when `shrink`).
/// Only raw system calls: safe to run in a signal handler.
fn drop_own(mask: u64, shrink: bool) -> bool {
    let mut ok = true;
    if shrink {
        for cap in 0..=CAP_LAST {
            if mask & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments; EINVAL for capabilities past the
                // kernel's last one is expected and ignored.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    ok &= rc == 0;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        CapData {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a valid header and two data structs (version 3), both outliving the
    // call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    ok && rc == 0
}

extern "C" fn on_signal(_: libc::c_int) {
    if !drop_own(
        EFFECTIVE.load(Ordering::SeqCst),
        SHRINK_BOUNDING.load(Ordering::SeqCst),
    ) {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
}

/// The threads of this process other than the caller, and whether each already has `mask` as
/// its effective set.
fn other_threads(mask: u64) -> io::Result<Vec<(i32, bool)>> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if tid == me {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue; // it ended
        };
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
        out.push((tid, eff == Some(mask)));
    }
    Ok(out)
}

/// Makes every other thread drop to `mask`, then returns; the caller drops its own after.
pub fn drop_in_other_threads(mask: u64, shrink: bool) -> io::Result<()> {
    EFFECTIVE.store(mask, Ordering::SeqCst);
    SHRINK_BOUNDING.store(shrink, Ordering::SeqCst);
    let signal = libc::SIGRTMIN() + 7;
    // SAFETY: installs a handler that only makes async-signal-safe calls and touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    loop {
        let pending: Vec<i32> = other_threads(mask)?
            .into_iter()
            .filter(|(_, done)| !done)
            .map(|(tid, _)| tid)
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "threads {pending:?} still hold other capabilities"
            )));
        }
        let before = DONE.load(Ordering::SeqCst);
        let mut sent = 0;
        for tid in &pending {
            // SAFETY: tgkill to a thread of this process (one that ended meanwhile gives ESRCH,
            // ignored).
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, signal) } == 0 {
                sent += 1;
            }
        }
        let wait_until = Instant::now() + Duration::from_millis(500);
        while DONE.load(Ordering::SeqCst) < before + sent && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if FAILED.load(Ordering::SeqCst) > 0 {
            return Err(io::Error::other("a thread could not drop its capabilities"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_thread_ends_with_the_callers_effective_set() {
        // Drop to what the process has now (a no-op for privileges), from a thread, with
        // others running: every thread must then show the caller's effective set.
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sleepers: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                })
            })
            .collect();
        super::drop_in_other_threads(mask, false).unwrap();
        assert!(
            super::other_threads(mask)
                .unwrap()
                .iter()
                .all(|(_, ok)| *ok)
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in sleepers {
            s.join().unwrap();
        }
    }
}
