//! Field offsets for the connect hooks' read of the connecting task's executable, taken from
//! the running kernel's BTF (Rust eBPF cannot carry CO-RE relocations; see
//! `latch_common::exe`).
use std::path::{Path, PathBuf};

use btfparse::{Offset, TypeInformation, TypeVariant};
use latch_common::exe::{ENABLED, LEADER, Offsets};

/// Where the kernel publishes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Why the offsets could not be had: `exe` selectors then match nothing.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("reading kernel BTF {path}: {source} (a kernel built without CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF {path}: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF: struct {strukt} has no member {member}: {why}")]
    NoMember {
        strukt: &'static str,
        member: &'static str,
        why: String,
    },
    #[error("kernel BTF: {strukt}.{member} is {found}, expected {expected}")]
    Shape {
        strukt: &'static str,
        member: &'static str,
        found: String,
        expected: &'static str,
    },
}

/// What a field must be for the program's fixed-width reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Pointer,
    /// An integer (through typedefs) of this many bytes.
    Int(usize),
    /// An array of this many elements (`char comm[16]`).
    Array(u32),
}

/// The BTF file's bytes, for the parser.
struct Bytes(Vec<u8>);

impl btfparse::Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF file",
            )),
        }
    }
}

/// Reads the offsets from a BTF file, normally [`VMLINUX`].
pub fn from_file(path: &Path) -> Result<Offsets, OffsetsError> {
    let bytes = std::fs::read(path).map_err(|source| OffsetsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let btf = TypeInformation::new(&Bytes(bytes)).map_err(|e| OffsetsError::Parse {
        path: path.to_owned(),
        why: describe(&e),
    })?;
    let mut offsets = Offsets {
        flags: ENABLED,
        task_mm: offset(&btf, "task_struct", "mm", Want::Pointer)?,
        mm_exe_file: offset(&btf, "mm_struct", "exe_file", Want::Pointer)?,
        file_inode: offset(&btf, "file", "f_inode", Want::Pointer)?,
        inode_ino: offset(&btf, "inode", "i_ino", Want::Int(8))?,
        inode_sb: offset(&btf, "inode", "i_sb", Want::Pointer)?,
        sb_dev: offset(&btf, "super_block", "s_dev", Want::Int(4))?,
        ..Offsets::default()
    };
    // The leader's start time and name spare the broker reading /proc per connection; a
    // kernel without them (start_boottime is 5.5+) only costs those reads.
    match leader_offsets(&btf) {
        Ok((leader, start, comm)) => {
            offsets.flags |= LEADER;
            offsets.task_group_leader = leader;
            offsets.task_start_boottime = start;
            offsets.task_comm = comm;
        }
        Err(e) => {
            tracing::info!(%e, "the connect hooks will not record the process's start time and name; the broker reads them from /proc")
        }
    }
    Ok(offsets)
}

fn leader_offsets(btf: &TypeInformation) -> Result<(u32, u32, u32), OffsetsError> {
    Ok((
        offset(btf, "task_struct", "group_leader", Want::Pointer)?,
        offset(btf, "task_struct", "start_boottime", Want::Int(8))?,
        offset(btf, "task_struct", "comm", Want::Array(16))?,
    ))
}

/// Byte offset of `strukt.member` (the parser looks through anonymous structs and unions: the
/// kernel wraps `mm_struct`'s fields in one), checking that the field is what the program
/// reads.
fn offset(
    btf: &TypeInformation,
    strukt: &'static str,
    member: &'static str,
    want: Want,
) -> Result<u32, OffsetsError> {
    let tid = btf.id_of(strukt).ok_or(OffsetsError::NoStruct(strukt))?;
    let (member_tid, at) = btf
        .offset_of(tid, member)
        .map_err(|e| OffsetsError::NoMember {
            strukt,
            member,
            why: describe(&e),
        })?;
    let shape = |found: String| OffsetsError::Shape {
        strukt,
        member,
        found,
        expected: match want {
            Want::Pointer => "a pointer",
            Want::Int(4) => "a 4-byte integer",
            Want::Int(_) => "an 8-byte integer",
            Want::Array(_) => "an array of 16",
        },
    };
    let bytes = match at {
        Offset::ByteOffset(b) => b,
        Offset::BitOffsetAndSize(bits, _) => {
            return Err(shape(format!("a bit field at bit {bits}")));
        }
    };
    match (want, strip(btf, member_tid)) {
        (Want::Pointer, Some(TypeVariant::Ptr(_))) => {}
        (Want::Int(n), Some(TypeVariant::Int(i))) if *i.size() == n => {}
        (Want::Array(n), Some(TypeVariant::Array(a))) if *a.element_count() == n => {}
        (_, Some(TypeVariant::Int(i))) => {
            return Err(shape(format!("a {}-byte integer", i.size())));
        }
        (_, other) => return Err(shape(format!("{other:?}"))),
    }
    Ok(bytes)
}

/// The parser's error in words (its type implements neither Display nor Error).
fn describe(e: &btfparse::Error) -> String {
    format!("{:?}: {}", e.kind(), e.message())
}

/// The type `tid` names, through typedefs and qualifiers.
fn strip(btf: &TypeInformation, mut tid: u32) -> Option<TypeVariant> {
    // A bound, so a malformed chain cannot loop.
    for _ in 0..16 {
        tid = match btf.from_id(tid)? {
            TypeVariant::Typedef(t) => *t.tid(),
            TypeVariant::Const(t) => *t.tid(),
            TypeVariant::Volatile(t) => *t.tid(),
            TypeVariant::Restrict(t) => *t.tid(),
            TypeVariant::TypeTag(t) => *t.tid(),
            other => return Some(other),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_gives_every_offset() {
        // Every machine latch runs on (and this project's CI) has kernel BTF; a kernel without
        // it is the agent's fail-closed case, tested through the error path below.
        let off = from_file(Path::new(VMLINUX)).expect("kernel BTF offsets");
        assert_eq!(off.flags, ENABLED | LEADER);
        assert!(off.task_mm > 0 && off.mm_exe_file > 0 && off.inode_sb > 0);
        assert!(off.task_group_leader > 0 && off.task_start_boottime > 0 && off.task_comm > 0);
        assert_eq!(off.task_group_leader % 8, 0, "{off:?}");
        assert_eq!(off.task_start_boottime % 8, 0, "{off:?}");
        // i_ino follows i_mode, i_opflags, i_uid, i_gid, i_flags and more.
        assert!(off.inode_ino > 0, "{off:?}");
        // Each is a field start, so pointers are 8-aligned.
        for o in [off.task_mm, off.mm_exe_file, off.file_inode, off.inode_sb] {
            assert_eq!(o % 8, 0, "{off:?}");
        }
    }

    #[test]
    fn a_missing_btf_file_is_an_error_naming_it() {
        let err = from_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
