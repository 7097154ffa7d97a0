//! The ext4 superblock fields stemforge reads itself, where they sit
//! (the kernel's Documentation/filesystems/ext4/): the scanner checks them
//! before trusting a damaged image to ext4-view, and a reproducible build
//! walks the inode tables with them.

/// Where the superblock starts on the file system.
pub const SUPERBLOCK_AT: u64 = 1024;
pub const INODES_COUNT: usize = 0x0;
pub const BLOCKS_COUNT_LO: usize = 0x4;
pub const FIRST_DATA_BLOCK: usize = 0x14;
pub const LOG_BLOCK_SIZE: usize = 0x18;
pub const BLOCKS_PER_GROUP: usize = 0x20;
pub const INODES_PER_GROUP: usize = 0x28;
pub const MAGIC: usize = 0x38;
pub const REV_LEVEL: usize = 0x4c;
pub const INODE_SIZE: usize = 0x58;
pub const INCOMPAT: usize = 0x60;
pub const RO_COMPAT: usize = 0x64;
pub const UUID: usize = 0x68;
pub const DESC_SIZE: usize = 0xfe;
pub const BLOCKS_COUNT_HI: usize = 0x150;
pub const CHECKSUM_SEED: usize = 0x270;

pub const MAGIC_VALUE: u16 = 0xef53;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
