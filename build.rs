//! The stage catalog, the OS profiles and the QEMU definitions are compiled
//! into the binary (include_dir); rebuild whenever any of them changes.
fn main() {
    for dir in ["stages", "os-profiles", "qemu"] {
        println!("cargo:rerun-if-changed={dir}");
    }
}
