//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod validate;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The stemforge binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stemforge"))
}

pub fn stemforge<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(bin())
        .args(args)
        .output()
        .expect("stemforge runs")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// End-to-end tests are `#[ignore]`d (they need root and the archive);
/// run explicitly without root, they fail here with the reason.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root (chroot, file ownership): run it as root"
    );
}

/// Scratch space under target/ (same file system as the build outputs).
pub fn scratch(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if p.exists() {
        let _ = Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(&p)
            .status();
    }
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Remove a scratch directory a test no longer needs (kept when it fails,
/// for a look).
pub fn done_with(p: &Path) {
    let _ = Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(p)
        .status();
}

/// Heavy end-to-end work (builds) runs one at a time.
pub fn heavy() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// One debian-bookworm build of every output without verify, kept for
/// every test of this binary: (out dir, raw image, hardened tree).
pub struct SharedBuild {
    pub out: PathBuf,
    pub raw: PathBuf,
    pub tree: PathBuf,
    pub log: String,
}

/// SOURCE_DATE_EPOCH of the shared build: 2025-12-01 00:00:00 UTC.
pub const SHARED_EPOCH: i64 = 1_764_547_200;

pub fn shared_build() -> &'static SharedBuild {
    static BUILD: OnceLock<SharedBuild> = OnceLock::new();
    BUILD.get_or_init(|| {
        let _g = heavy();
        let out = scratch("shared-build");
        // Built twice (--check-reproducible): every output's sha256 is
        // compared with a second build's (NAME.reproducible.json).
        let o = Command::new(bin())
            .args([
                "build",
                "--profile",
                "debian-bookworm",
                "--no-verify",
                "--format",
                "all",
                "--image-version",
                "1.0",
                "--bosh-agent",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/bosh-agent/bosh-agent"
                ),
                "--keep-work",
                "--check-reproducible",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("SOURCE_DATE_EPOCH", SHARED_EPOCH.to_string())
            .output()
            .expect("stemforge runs");
        assert!(o.status.success(), "shared build failed:\n{}", text(&o));
        SharedBuild {
            raw: out.join("debian-bookworm.raw"),
            tree: out.join(".work/debian-bookworm/tree"),
            log: text(&o),
            out,
        }
    })
}

/// The stock tree: what the bootstrap made, without the few files it
/// seeds before packages install (the stages' modprobe.d files, so the
/// kernel's initramfs carries them): a plain mmdebstrap of the profile.
pub fn stock_tree() -> PathBuf {
    static STOCK: OnceLock<PathBuf> = OnceLock::new();
    STOCK
        .get_or_init(|| {
            let b = shared_build();
            let log = std::fs::read_to_string(b.out.join("debian-bookworm.build.log")).unwrap();
            let line = log
                .lines()
                .find(|l| l.starts_with("bootstrapped tree: "))
                .expect("the build log names the bootstrapped tree");
            let cached = PathBuf::from(line.trim_start_matches("bootstrapped tree: "));
            let spec: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(cached.parent().unwrap().join("spec.json")).unwrap(),
            )
            .unwrap();
            let copy = scratch("stock-tree").join("rootfs");
            let st = Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&cached)
                .arg(&copy)
                .status()
                .unwrap();
            assert!(st.success());
            for seed in spec["seed"].as_array().unwrap() {
                let path = seed[0].as_str().unwrap();
                std::fs::remove_file(copy.join(path.trim_start_matches('/'))).unwrap();
            }
            copy
        })
        .clone()
}
