//! The connecting task's executable: `current->mm->exe_file->f_inode`'s inode number and its
//! super block's device, read with field offsets the agent took from the kernel's BTF (see
//! `latch_common::exe`).
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};
use latch_common::exe::{self, Offsets};

/// Set by the agent at load time (`EbpfLoader::override_global`). It lives in `.rodata`,
/// which the loader freezes: the verifier knows its value, so with `flags` 0 the reads below
/// are dead code it never checks (a kernel that refuses the helpers to this program type
/// still loads it).
#[unsafe(no_mangle)]
static LATCH_EXE_OFFSETS: Offsets = Offsets {
    flags: 0,
    task_mm: 0,
    mm_exe_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_group_leader: 0,
    task_start_boottime: 0,
    task_comm: 0,
};

/// What was recorded: `(kernel dev_t, inode number, status)`; the inode is 0 unless the
/// status is [`exe::RECORDED`].
#[inline(always)]
pub fn current() -> (u32, u64, u32) {
    // SAFETY: a plain read of our own global; volatile so that the compiler does not fold
    // the initial value in: the loader overrides it.
    let off = unsafe { core::ptr::read_volatile(&LATCH_EXE_OFFSETS) };
    if off.flags & exe::ENABLED == 0 {
        return (0, 0, exe::NO_OFFSETS);
    }
    match read(&off) {
        Ok(Some((dev, ino))) if ino != 0 => (dev, ino, exe::RECORDED),
        Ok(_) => (0, 0, exe::NO_MM),
        Err(()) => (0, 0, exe::READ_FAILED),
    }
}

/// The connecting process's thread group leader: its start time (CLOCK_BOOTTIME ns) and
/// command name; `(0, [0; 16])` when the offsets are not there or a read fails.
#[inline(always)]
pub fn leader() -> (u64, [u8; 16]) {
    // SAFETY: as in `current`.
    let off = unsafe { core::ptr::read_volatile(&LATCH_EXE_OFFSETS) };
    if off.flags & exe::LEADER == 0 {
        return (0, [0; 16]);
    }
    read_leader(&off).unwrap_or((0, [0; 16]))
}

#[inline(always)]
fn read_leader(off: &Offsets) -> Result<(u64, [u8; 16]), ()> {
    // SAFETY: as in `read`: only bpf_probe_read_kernel dereferences.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let leader = ptr_at(task, off.task_group_leader)?;
        if leader.is_null() {
            return Err(());
        }
        let start: u64 = bpf_probe_read_kernel(leader.add(off.task_start_boottime as usize).cast())
            .map_err(|_| ())?;
        let comm: [u8; 16] =
            bpf_probe_read_kernel(leader.add(off.task_comm as usize).cast()).map_err(|_| ())?;
        Ok((start, comm))
    }
}

/// `Ok(None)`: the task has no memory map or no executable file.
#[inline(always)]
fn read(off: &Offsets) -> Result<Option<(u32, u64)>, ()> {
    // SAFETY: bpf_get_current_task has no preconditions; every dereference below goes through
    // bpf_probe_read_kernel, which fails cleanly on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let mm = ptr_at(task, off.task_mm)?;
        if mm.is_null() {
            return Ok(None);
        }
        let file = ptr_at(mm, off.mm_exe_file)?;
        if file.is_null() {
            return Ok(None);
        }
        let inode = ptr_at(file, off.file_inode)?;
        if inode.is_null() {
            return Ok(None);
        }
        let ino: u64 =
            bpf_probe_read_kernel(inode.add(off.inode_ino as usize).cast()).map_err(|_| ())?;
        let sb = ptr_at(inode, off.inode_sb)?;
        if sb.is_null() {
            return Ok(None);
        }
        let dev: u32 = bpf_probe_read_kernel(sb.add(off.sb_dev as usize).cast()).map_err(|_| ())?;
        Ok(Some((dev, ino)))
    }
}

/// Reads the pointer at `base + offset`.
///
/// # Safety
/// `base` is a kernel address; it is never dereferenced directly.
#[inline(always)]
unsafe fn ptr_at(base: *const u8, offset: u32) -> Result<*const u8, ()> {
    // SAFETY: read through the helper, see above.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<*const u8>()) }.map_err(|_| ())
}
