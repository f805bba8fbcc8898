//! Reading a running process's memory (`/proc/PID/maps` and `/proc/PID/mem`; the tests run as
//! root) to look for bytes that should not be there.
use std::os::unix::fs::FileExt as _;

/// One place `needle` was found: its address and the mapping it is in (`[heap]`, a path, or
/// empty for an anonymous mapping).
#[derive(Debug)]
pub struct Hit {
    pub addr: u64,
    pub mapping: String,
}

/// Every occurrence of `needle` in the readable mappings of process `pid`. Mappings the kernel
/// will not let us read (`[vvar]`, guard pages) are skipped.
pub fn find(pid: u32, needle: &[u8]) -> Vec<Hit> {
    assert!(!needle.is_empty());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/maps: {e}"));
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + needle.len()];
    let mut hits = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let mapping = parts.nth(3).unwrap_or("").to_string();
        if !perms.starts_with('r') || mapping.starts_with("[vvar") || mapping == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').expect("maps range");
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        // Read in chunks that overlap by the needle's length less one, so no occurrence is
        // split between two reads.
        let mut at = start;
        let mut carried = 0usize;
        while at < end {
            let want = CHUNK.min((end - at) as usize);
            let got = match mem.read_at(&mut buf[carried..carried + want], at) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let filled = carried + got;
            let base = at - carried as u64;
            let mut from = 0;
            while let Some(i) = position(&buf[from..filled], needle) {
                hits.push(Hit {
                    addr: base + (from + i) as u64,
                    mapping: mapping.clone(),
                });
                from += i + 1;
            }
            carried = (needle.len() - 1).min(filled);
            buf.copy_within(filled - carried..filled, 0);
            at += got as u64;
        }
    }
    hits
}

fn position(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut from = 0;
    while from + needle.len() <= hay.len() {
        let i = from
            + hay[from..=hay.len() - needle.len()]
                .iter()
                .position(|&b| b == first)?;
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_what_this_process_holds_across_chunks() {
        // Built at run time, so only the heap holds it whole.
        let text: String = ["needle-", "6f2a", "-in-", "this-process"].concat();
        let hits = super::find(std::process::id(), text.as_bytes());
        assert!(
            hits.iter().any(|h| h.addr == text.as_ptr() as u64),
            "{hits:?}"
        );
        assert_eq!(super::position(b"aab", b"ab"), Some(1));
        assert_eq!(super::position(b"a", b"ab"), None);
    }
}
