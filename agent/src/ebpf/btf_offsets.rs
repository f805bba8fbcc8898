//! Field offsets for the connect hooks' read of the connecting task's executable, taken from
//! the running kernel's BTF (Rust eBPF cannot carry CO-RE relocations; see
//! `latch_common::exe`).
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use latch_common::exe::{ENABLED, Offsets};

/// Where the kernel publishes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Why the offsets could not be had: `exe` selectors then match nothing.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("reading kernel BTF {path}: {source} (a kernel built without CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF: {what}: {source}")]
    Parse {
        what: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember {
        strukt: &'static str,
        member: &'static str,
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
}

/// Reads the offsets from a BTF file, normally [`VMLINUX`].
pub fn from_file(path: &Path) -> Result<Offsets, OffsetsError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetsError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Offsets {
        flags: ENABLED,
        task_mm: offset(&btf, "task_struct", "mm", Want::Pointer)?,
        mm_exe_file: offset(&btf, "mm_struct", "exe_file", Want::Pointer)?,
        file_inode: offset(&btf, "file", "f_inode", Want::Pointer)?,
        inode_ino: offset(&btf, "inode", "i_ino", Want::Int(8))?,
        inode_sb: offset(&btf, "inode", "i_sb", Want::Pointer)?,
        sb_dev: offset(&btf, "super_block", "s_dev", Want::Int(4))?,
        _pad: 0,
    })
}

/// Byte offset of `strukt.member`, looking through anonymous structs and unions (the kernel
/// wraps `mm_struct`'s fields in one), and checking that the field is what the program reads.
fn offset(
    btf: &Btf,
    strukt: &'static str,
    member: &'static str,
    want: Want,
) -> Result<u32, OffsetsError> {
    let parse = |source| OffsetsError::Parse {
        what: format!("struct {strukt}"),
        source,
    };
    let types = btf.resolve_types_by_name(strukt).map_err(parse)?;
    // Forward declarations share the name; the definition is the struct with members.
    let def = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or(OffsetsError::NoStruct(strukt))?;
    let (bits, ty) = find(btf, def, member)
        .map_err(parse)?
        .ok_or(OffsetsError::NoMember { strukt, member })?;
    let shape = |found: String| OffsetsError::Shape {
        strukt,
        member,
        found,
        expected: match want {
            Want::Pointer => "a pointer",
            Want::Int(4) => "a 4-byte integer",
            Want::Int(_) => "an 8-byte integer",
        },
    };
    if bits % 8 != 0 {
        return Err(shape(format!("a bit field at bit {bits}")));
    }
    let ty = strip(btf, ty).map_err(parse)?;
    match (want, &ty) {
        (Want::Pointer, Type::Ptr(_)) => {}
        (Want::Int(n), Type::Int(i)) if i.size() == n => {}
        (_, Type::Int(i)) => return Err(shape(format!("a {}-byte integer", i.size()))),
        (_, other) => return Err(shape(format!("a {}", other.name()))),
    }
    Ok(bits / 8)
}

/// The bit offset and type of `name` in `s`, searching anonymous members depth first.
fn find(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>, btf_rs::Error> {
    for m in &s.members {
        if m.bitfield_size().is_some_and(|b| b != 0) {
            continue;
        }
        let member_name = btf.resolve_name(m)?;
        let ty = btf.resolve_chained_type(m)?;
        if member_name == name {
            return Ok(Some((m.bit_offset(), ty)));
        }
        if member_name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &ty
            && let Some((bits, found)) = find(btf, inner, name)?
        {
            return Ok(Some((m.bit_offset() + bits, found)));
        }
    }
    Ok(None)
}

/// Follows typedefs and qualifiers to the type they name.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, btf_rs::Error> {
    // A bound, so a malformed chain cannot loop.
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        };
    }
    Ok(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_gives_every_offset() {
        // Every machine latch runs on (and this project's CI) has kernel BTF; a kernel without
        // it is the agent's fail-closed case, tested through the error path below.
        let off = from_file(Path::new(VMLINUX)).expect("kernel BTF offsets");
        assert_eq!(off.flags, ENABLED);
        assert!(off.task_mm > 0 && off.mm_exe_file > 0 && off.inode_sb > 0);
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
