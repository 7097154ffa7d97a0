//! The data compiled into the binary: the stage catalog, the OS profiles and
//! the QEMU verification definitions. The scanner and the build work from
//! these on any host (and inside the image) with no files beside the binary.

use include_dir::{Dir, include_dir};

pub static STAGES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/stages");
pub static PROFILES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/os-profiles");
pub static QEMU: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/qemu");
