//! A disk image: a host file (or an anonymous memfd scratch disk) read and written at offsets.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rebound_abi::io::SECTOR_SIZE;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The size is not usable.
    #[error("disk image {path} is {size} bytes: it must be a non-zero multiple of {SECTOR_SIZE}")]
    BadSize {
        /// The path given.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Creating a scratch disk failed.
    #[error("cannot create a scratch disk: {0}")]
    Scratch(#[source] io::Error),
}

/// A disk the I/O queue reads and writes.
#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    read_only: bool,
}

impl Disk {
    /// Opens a disk image file.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: name.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: name.clone(),
                source,
            })?
            .len();
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize { path: name, size });
        }
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    /// An anonymous, zero-filled disk of `size` bytes that vanishes with the VMM.
    pub fn scratch(size: u64) -> Result<Self, DiskError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadSize {
                path: "<scratch>".into(),
                size,
            });
        }
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"rebound-scratch-disk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(DiskError::Scratch(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(DiskError::Scratch)?;
        Ok(Self {
            file,
            size,
            read_only: false,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
