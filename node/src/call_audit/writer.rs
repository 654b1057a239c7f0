//! The call log's file: lines appended to `calls.jsonl`, which is rotated by size
//! (`calls.jsonl` → `.1` → `.2`..., the oldest past `max_files` removed), written by one thread
//! so calls never wait on the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::config::CallAuditConfig;

/// The current file and its size.
pub struct Writer {
    dir: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_file_bytes: u64,
    max_files: u32,
}

const CURRENT: &str = "calls.jsonl";

impl Writer {
    pub fn open(dir: &Path, config: &CallAuditConfig) -> std::io::Result<Writer> {
        fs::create_dir_all(dir)?;
        // Who called what is for the node's operator only, like the rest of the data dir.
        #[cfg(unix)]
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let (out, size) = open_current(dir)?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            out,
            size,
            max_file_bytes: config.max_file_bytes,
            max_files: config.max_files,
        })
    }

    /// Appends one line (rotating first when it would not fit).
    pub fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.max_file_bytes {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let name = |i: u32| self.dir.join(format!("{CURRENT}.{i}"));
        let _ = fs::remove_file(name(self.max_files));
        for i in (1..self.max_files).rev() {
            if name(i).exists() {
                fs::rename(name(i), name(i + 1))?;
            }
        }
        fs::rename(self.dir.join(CURRENT), name(1))?;
        let (out, size) = open_current(&self.dir)?;
        self.out = out;
        self.size = size;
        metrics::counter!("mcpd_call_audit_rotations_total").increment(1);
        Ok(())
    }
}

fn open_current(dir: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let path = dir.join(CURRENT);
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(&path)?;
    let size = file.metadata()?.len();
    Ok((BufWriter::with_capacity(64 << 10, file), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_rotate_by_size_and_the_oldest_goes() {
        let dir = tempfile::tempdir().unwrap();
        let config = CallAuditConfig {
            max_file_bytes: 4096,
            max_files: 2,
            ..CallAuditConfig::default()
        };
        let mut w = Writer::open(dir.path(), &config).unwrap();
        let line = vec![b'x'; 1000];
        for _ in 0..20 {
            w.append(&line).unwrap();
        }
        w.flush().unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["calls.jsonl", "calls.jsonl.1", "calls.jsonl.2"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&dir.path().join("calls.jsonl")), 0o600);
        for n in &names {
            let size = fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(size <= 4096, "{n}: {size}");
        }
    }
}
