//! The executable a process ran when it connected, as the kernel recorded it, and what an
//! `exe` selector compares it with: the identity (device, inode) of the file the policy
//! names, read with `stat()` at match time.
//!
//! The path the process runs (`/proc/<pid>/exe`) is read at accept time for display only: a
//! process can connect and then exec another binary, keeping the socket.
use std::{fmt, io, os::unix::fs::MetadataExt as _, path::Path};

use latch_common::{ConnMeta, exe};
use serde::{Serialize, Serializer, ser::SerializeMap as _};

/// A file's identity: device (user-space encoding, as `st_dev`) and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExeId {
    pub dev: u64,
    pub ino: u64,
}

impl ExeId {
    /// The identity of the file at `path` (symbolic links followed, as exec follows them).
    pub fn of_path(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl fmt::Display for ExeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} inode {}",
            libc::major(self.dev),
            libc::minor(self.dev),
            self.ino
        )
    }
}

/// The kernel's `dev_t` (`super_block.s_dev`: `major << 20 | minor`) in the encoding
/// user space sees in `st_dev` (glibc's `makedev`, which also places minors above 255
/// differently).
pub fn user_dev(kernel_dev: u32) -> u64 {
    libc::makedev(kernel_dev >> 20, kernel_dev & 0xf_ffff)
}

/// Why the kernel recorded no executable for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecorded {
    /// The programs were loaded without field offsets (no kernel BTF, or the kernel refused
    /// the reads); the agent's start-up log says which.
    NoOffsets,
    /// The connecting task had no memory map or executable file.
    NoExecutable,
    /// A kernel read on the way failed.
    ReadFailed,
    /// A status this agent does not know.
    Status(u32),
}

impl fmt::Display for Unrecorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoOffsets => f.write_str(
                "the kernel programs run without the executable's field offsets (see the \
                 agent's start-up log)",
            ),
            Self::NoExecutable => f.write_str("the connecting task had no executable file"),
            Self::ReadFailed => {
                f.write_str("the kernel could not read the connecting task's executable")
            }
            Self::Status(s) => write!(f, "unknown kernel status {s}"),
        }
    }
}

/// What the kernel recorded about the executable at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExeRecord {
    Recorded(ExeId),
    Unrecorded(Unrecorded),
}

impl Default for ExeRecord {
    fn default() -> Self {
        Self::Unrecorded(Unrecorded::NoOffsets)
    }
}

impl From<&ConnMeta> for ExeRecord {
    fn from(m: &ConnMeta) -> Self {
        match m.exe_status {
            exe::RECORDED if m.exe_ino != 0 => Self::Recorded(ExeId {
                dev: user_dev(m.exe_dev),
                ino: m.exe_ino,
            }),
            exe::RECORDED | exe::NO_MM => Self::Unrecorded(Unrecorded::NoExecutable),
            exe::NO_OFFSETS => Self::Unrecorded(Unrecorded::NoOffsets),
            exe::READ_FAILED => Self::Unrecorded(Unrecorded::ReadFailed),
            other => Self::Unrecorded(Unrecorded::Status(other)),
        }
    }
}

/// Flattened into the audit record's `workload`: `exe_dev` ("major:minor") and `exe_ino`, or
/// `exe_unrecorded` with the reason.
impl Serialize for ExeRecord {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Recorded(id) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry(
                    "exe_dev",
                    &format!("{}:{}", libc::major(id.dev), libc::minor(id.dev)),
                )?;
                map.serialize_entry("exe_ino", &id.ino)?;
                map.end()
            }
            Self::Unrecorded(why) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("exe_unrecorded", &why.to_string())?;
                map.end()
            }
        }
    }
}

/// How a recorded executable compares with the file an `exe` selector names.
#[derive(Debug)]
pub enum ExeMatch {
    Same,
    /// Another file (or the same path since replaced: an upgrade makes a new inode).
    Different {
        recorded: ExeId,
        named: ExeId,
    },
    /// The kernel recorded nothing: `exe` fails closed.
    Unrecorded(Unrecorded),
    /// The named file cannot be read: `exe` fails closed.
    Unreadable(io::Error),
}

impl ExeRecord {
    /// Compares with the file at `path` as it is now.
    pub fn compare(&self, path: &Path) -> ExeMatch {
        let recorded = match self {
            Self::Recorded(id) => *id,
            Self::Unrecorded(why) => return ExeMatch::Unrecorded(*why),
        };
        match ExeId::of_path(path) {
            Ok(named) if named == recorded => ExeMatch::Same,
            Ok(named) => ExeMatch::Different { recorded, named },
            Err(err) => ExeMatch::Unreadable(err),
        }
    }
}

impl fmt::Display for ExeMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Same => f.write_str("the same executable"),
            Self::Different { recorded, named } => write!(
                f,
                "a different executable (connected as {recorded}, the file is {named})"
            ),
            Self::Unrecorded(why) => write!(f, "no executable recorded at connect: {why}"),
            Self::Unreadable(err) => write!(f, "cannot stat the file: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn kernel_dev_t_becomes_the_st_dev_encoding() {
        // 8:1 (sda1), 259:3 (nvme), 0:45 (an anonymous device: tmpfs, overlay), and a minor
        // past 255, which the two encodings place differently.
        for (major, minor) in [
            (8u32, 1u32),
            (259, 3),
            (0, 45),
            (253, 300),
            (4095, 0xf_ffff),
        ] {
            let kernel = major << 20 | minor;
            let dev = user_dev(kernel);
            assert_eq!((libc::major(dev), libc::minor(dev)), (major, minor));
            assert_eq!(dev, libc::makedev(major, minor));
        }
        // The kernel's new_encode_dev: (minor & 0xff) | major << 8 | (minor & !0xff) << 12.
        assert_eq!(user_dev(8 << 20 | 1), 0x801);
        assert_eq!(user_dev(253 << 20 | 300), 0x10_fd2c);
    }

    #[test]
    fn a_recorded_identity_matches_only_the_file_it_names_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"a").unwrap();
        std::fs::copy(&a, &b).unwrap();
        let id_a = ExeId::of_path(&a).unwrap();
        let rec = ExeRecord::Recorded(id_a);
        assert!(matches!(rec.compare(&a), ExeMatch::Same));
        // A copy has the same bytes and another inode.
        assert!(matches!(rec.compare(&b), ExeMatch::Different { .. }));
        // A symbolic link to the file is the file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        assert!(matches!(rec.compare(&link), ExeMatch::Same));
        // Replaced in place (as a package upgrade does: write a new file, rename it over):
        // a process that connected with the old file no longer matches.
        let new = dir.path().join("a.new");
        std::fs::File::create(&new)
            .unwrap()
            .write_all(b"a2")
            .unwrap();
        std::fs::rename(&new, &a).unwrap();
        let m = rec.compare(&a);
        assert!(matches!(m, ExeMatch::Different { .. }), "{m}");
        assert!(m.to_string().contains("different executable"), "{m}");
        let gone = rec.compare(&dir.path().join("missing"));
        assert!(matches!(gone, ExeMatch::Unreadable(_)), "{gone}");
    }

    #[test]
    fn nothing_recorded_matches_nothing_and_says_why() {
        let me = std::env::current_exe().unwrap();
        for (status, ino) in [
            (exe::NO_OFFSETS, 0),
            (exe::NO_MM, 0),
            (exe::READ_FAILED, 0),
            (exe::RECORDED, 0),
            (99, 5),
        ] {
            let meta = ConnMeta {
                exe_status: status,
                exe_ino: ino,
                ..Default::default()
            };
            let rec = ExeRecord::from(&meta);
            let m = rec.compare(&me);
            assert!(matches!(m, ExeMatch::Unrecorded(_)), "{status}: {m}");
            let json = serde_json::to_value(rec).unwrap();
            assert!(json["exe_unrecorded"].is_string(), "{json}");
        }
        let no_offsets = ExeRecord::from(&ConnMeta {
            exe_status: exe::NO_OFFSETS,
            ..Default::default()
        });
        assert!(
            no_offsets
                .compare(&me)
                .to_string()
                .contains("field offsets")
        );
    }

    #[test]
    fn a_kernel_record_of_this_very_file_matches_it() {
        let me = std::env::current_exe().unwrap();
        let id = ExeId::of_path(&me).unwrap();
        let kernel_dev = libc::major(id.dev) << 20 | libc::minor(id.dev);
        let meta = ConnMeta {
            exe_status: exe::RECORDED,
            exe_dev: kernel_dev,
            exe_ino: id.ino,
            ..Default::default()
        };
        let rec = ExeRecord::from(&meta);
        assert!(matches!(rec.compare(&me), ExeMatch::Same));
        let json = serde_json::to_value(rec).unwrap();
        assert_eq!(json["exe_ino"], id.ino);
        assert_eq!(
            json["exe_dev"],
            format!("{}:{}", libc::major(id.dev), libc::minor(id.dev))
        );
    }
}
