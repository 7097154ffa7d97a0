//! A read-only qcow2 reader for image scans: the guest disk's bytes at
//! any offset, reading only the clusters asked for, so a scan touches a
//! few megabytes of a compressed image instead of converting all of it.
//!
//! Hand-written because the maintained crates either panic on damaged
//! input, cannot read compressed clusters, or are async (qcow, qcow2,
//! qcow2-core, qcow2-rs were tried); a scanner reads untrusted images,
//! so every size and offset here is checked against the file. Supported:
//! versions 2 and 3, zlib-compressed and plain clusters, zero clusters;
//! refused with a clear error: backing files, encryption, external data
//! files, extended L2 entries, zstd compression.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

/// Entries kept in each cache before it is cleared.
const CACHE_ENTRIES: usize = 256;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {}", msg.into()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[derive(Debug)]
pub struct Qcow2 {
    file: File,
    file_len: u64,
    cluster_bits: u32,
    /// The guest disk's size.
    pub size: u64,
    l1: Vec<u64>,
    l2: HashMap<u64, Rc<Vec<u64>>>,
    clusters: HashMap<u64, Rc<Vec<u8>>>,
}

/// Bits 9..=55 of an L1 or standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Qcow2 {
    pub fn open(file: File) -> io::Result<Qcow2> {
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 112];
        let n = file.read_at(&mut h, 0)?;
        if n < 72 || &h[..4] != b"QFI\xfb" {
            return Err(bad("not a qcow2 file (no QFI magic or a short header)"));
        }
        let version = be32(&h, 4);
        if !(2..=3).contains(&version) {
            return Err(bad(format!("unsupported version {version}")));
        }
        if be64(&h, 8) != 0 {
            return Err(bad("the image has a backing file; scan the merged image"));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} out of range")));
        }
        let size = be64(&h, 24);
        if be32(&h, 32) != 0 {
            return Err(bad("the image is encrypted"));
        }
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        if version == 3 {
            if n < 104 {
                return Err(bad("a version 3 header shorter than 104 bytes"));
            }
            let incompatible = be64(&h, 72);
            if incompatible & !0b1011 != 0 {
                return Err(bad(format!(
                    "incompatible features {incompatible:#x} (external data file or extended L2 entries)"
                )));
            }
            let header_len = be32(&h, 100) as usize;
            if incompatible & 0b1000 != 0 && header_len > 104 && n > 104 && h[104] != 0 {
                return Err(bad("zstd-compressed clusters are not supported"));
            }
        }
        let cluster = 1u64 << cluster_bits;
        // Entries needed to map the whole disk, with the spec's cap on the
        // table (32 MiB).
        let needed = size.div_ceil(cluster).div_ceil(cluster / 8);
        if l1_size < needed || l1_size > (32 << 20) / 8 {
            return Err(bad(format!(
                "L1 table of {l1_size} entries does not map a {size}-byte disk"
            )));
        }
        let l1_bytes = l1_size * 8;
        if l1_offset.checked_add(l1_bytes).is_none_or(|e| e > file_len) {
            return Err(bad("the L1 table lies beyond the end of the file"));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, l1_offset)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut q = Qcow2 {
            file,
            file_len,
            cluster_bits,
            size,
            l1,
            l2: HashMap::new(),
            clusters: HashMap::new(),
        };
        q.check_tables()?;
        Ok(q)
    }

    /// Every table and cluster the image maps lies inside the file: a
    /// truncated image is refused when opened, not found out file by
    /// file during a scan. Each distinct L2 table is read once, so the
    /// work is bounded by the file's size.
    fn check_tables(&mut self) -> io::Result<()> {
        let mut seen = std::collections::HashSet::new();
        let cluster = self.cluster_size();
        for l1 in self.l1.clone() {
            let offset = l1 & OFFSET_MASK;
            if offset == 0 || !seen.insert(offset) {
                continue;
            }
            // L2 tables start on cluster boundaries (the spec says so, and
            // qemu refuses others): at most one table per cluster of the
            // file, so checking them reads the file at most once, where
            // tables 512 bytes apart would read it thousands of times.
            if offset % cluster != 0 {
                return Err(bad(format!(
                    "an L2 table at byte {offset}, not on a {cluster}-byte cluster boundary"
                )));
            }
            let table = self.l2_table(offset)?;
            for &entry in table.iter() {
                let (host, len) = if entry & (1 << 62) != 0 {
                    let x = 62 - (self.cluster_bits - 8);
                    (entry & ((1u64 << x) - 1), 1)
                } else {
                    (entry & OFFSET_MASK, cluster)
                };
                if host != 0 && host.checked_add(len).is_none_or(|e| e > self.file_len) {
                    return Err(bad(format!(
                        "a cluster at byte {host} lies beyond the end of the {}-byte file (truncated?)",
                        self.file_len
                    )));
                }
            }
        }
        self.l2.clear();
        Ok(())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn read_host(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.file_len)
        {
            return Err(bad(format!(
                "a cluster at {offset} lies beyond the end of the file"
            )));
        }
        self.file.read_exact_at(buf, offset)
    }

    fn l2_table(&mut self, offset: u64) -> io::Result<Rc<Vec<u64>>> {
        if let Some(t) = self.l2.get(&offset) {
            return Ok(Rc::clone(t));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.read_host(&mut raw, offset)?;
        let t = Rc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        if self.l2.len() >= CACHE_ENTRIES {
            self.l2.clear();
        }
        self.l2.insert(offset, Rc::clone(&t));
        Ok(t)
    }

    /// The guest cluster `index`'s bytes (`None`: reads as zeros).
    fn cluster(&mut self, index: u64) -> io::Result<Option<Rc<Vec<u8>>>> {
        let l2_bits = self.cluster_bits - 3;
        let l1_index = (index >> l2_bits) as usize;
        let l1 = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| bad("an offset beyond the L1 table"))?;
        let l2_offset = l1 & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(None);
        }
        let table = self.l2_table(l2_offset)?;
        let entry = table[(index & ((1 << l2_bits) - 1)) as usize];
        if let Some(c) = self.clusters.get(&entry) {
            return Ok(Some(Rc::clone(c)));
        }
        let size = self.cluster_size() as usize;
        let data = if entry & (1 << 62) != 0 {
            // Compressed: the host offset and a sector count share the entry.
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            if len == 0 || len > 2 * size as u64 {
                return Err(bad(format!("a compressed cluster of {len} bytes")));
            }
            let mut packed = vec![0u8; len as usize];
            // The last sector may run past the end of the file.
            let avail = self.file_len.saturating_sub(host).min(len) as usize;
            self.read_host(&mut packed[..avail], host)?;
            let mut out = vec![0u8; size];
            let mut z = flate2::Decompress::new(false);
            z.decompress(&packed[..avail], &mut out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(format!("a compressed cluster does not inflate: {e}")))?;
            if z.total_out() as usize != size {
                return Err(bad(format!(
                    "a compressed cluster inflates to {} bytes, not {size}",
                    z.total_out()
                )));
            }
            out
        } else {
            let host = entry & OFFSET_MASK;
            if host == 0 || entry & 1 != 0 {
                return Ok(None);
            }
            let mut out = vec![0u8; size];
            self.read_host(&mut out, host)?;
            out
        };
        let data = Rc::new(data);
        if self.clusters.len() >= CACHE_ENTRIES {
            self.clusters.clear();
        }
        self.clusters.insert(entry, Rc::clone(&data));
        Ok(Some(data))
    }

    /// Fill `dst` with the guest disk's bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        if offset
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(bad(format!(
                "a read at {offset} beyond the {}-byte disk",
                self.size
            )));
        }
        let cluster = self.cluster_size();
        let mut done = 0usize;
        while done < dst.len() {
            let pos = offset + done as u64;
            let within = (pos % cluster) as usize;
            let n = (cluster as usize - within).min(dst.len() - done);
            match self.cluster(pos / cluster)? {
                Some(c) => dst[done..done + n].copy_from_slice(&c[within..within + n]),
                None => dst[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_qemu_img_wrote_compressed_or_not() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("disk.raw");
        // 3 MiB with recognisable data at a few offsets, holes between.
        let mut bytes = vec![0u8; 3 << 20];
        for (i, b) in bytes[4096..8192].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        bytes[(2 << 20) + 5..(2 << 20) + 16].copy_from_slice(b"lorem ipsum");
        std::fs::write(&raw, &bytes).unwrap();
        for compress in [false, true] {
            let q = d.path().join(format!("disk-{compress}.qcow2"));
            let mut args = vec!["convert", "-O", "qcow2"];
            if compress {
                args.push("-c");
            }
            let st = std::process::Command::new("qemu-img")
                .args(&args)
                .arg(&raw)
                .arg(&q)
                .status()
                .unwrap();
            assert!(st.success());
            let mut r = Qcow2::open(File::open(&q).unwrap()).unwrap();
            assert_eq!(r.size, bytes.len() as u64);
            let mut got = vec![0u8; bytes.len()];
            r.read_at(0, &mut got).unwrap();
            assert!(got == bytes, "compress {compress}: the disk reads back");
            let mut word = [0u8; 11];
            r.read_at((2 << 20) + 5, &mut word).unwrap();
            assert_eq!(&word, b"lorem ipsum");
            assert!(r.read_at(bytes.len() as u64 - 4, &mut [0u8; 8]).is_err());
            // A damaged copy is an error, never a panic.
            let mut damaged = std::fs::read(&q).unwrap();
            damaged.truncate(damaged.len() / 2);
            let t = d.path().join("damaged.qcow2");
            std::fs::write(&t, &damaged).unwrap();
            if let Ok(mut r) = Qcow2::open(File::open(&t).unwrap()) {
                let mut all = vec![0u8; bytes.len()];
                assert!(r.read_at(0, &mut all).is_err() || all != bytes);
            }
        }
        std::fs::write(d.path().join("junk.qcow2"), b"QFI\xfb\0\0\0\x07").unwrap();
        let e = Qcow2::open(File::open(d.path().join("junk.qcow2")).unwrap()).unwrap_err();
        assert!(e.to_string().contains("qcow2"), "{e}");
    }
}
