//! Commands inside the image tree, each in a private mount and PID
//! namespace of its own.
//!
//! Every command runs as
//! `unshare --mount --pid --fork --kill-child --propagation private`, which
//! mounts /proc, /sys, a small /dev and /run inside the tree and then
//! chroots. The mounts exist only in that namespace: when the command ends,
//! or stemforge is killed (PR_SET_PDEATHSIG kills `unshare`, whose
//! `--kill-child` kills the namespace's init and with it every process in
//! it), the namespace and its mounts disappear. Nothing can be left mounted
//! in the host's namespace, and the tree can always be deleted safely.

use crate::exec::{self, Cmd};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Sets up the namespace's mounts, then execs chroot. `$1` is the tree.
const ENTER: &str = r#"set -e
R="$1"; shift
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t tmpfs -o mode=0755,nosuid,size=16m stemforge-dev "$R/dev"
for n in null zero full random urandom tty; do
  : > "$R/dev/$n"
  mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -sf pts/ptmx "$R/dev/ptmx"
ln -sf /proc/self/fd "$R/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev stemforge-shm "$R/dev/shm"
mount -t tmpfs -o mode=0755,nosuid,nodev stemforge-run "$R/run"
exec chroot "$R" "$@"
"#;

/// The environment commands see inside the tree.
const ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LC_ALL", "C.UTF-8"),
    ("LANG", "C.UTF-8"),
    ("HOME", "/root"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ("TERM", "dumb"),
];

/// The policy that keeps package scripts from starting services while the
/// image is being built.
pub const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A root tree to run commands in.
#[derive(Debug, Clone)]
pub struct Chroot {
    root: PathBuf,
    /// SOURCE_DATE_EPOCH for the commands inside (useradd's dates,
    /// mkinitramfs's clamped times).
    epoch: Option<i64>,
}

impl Chroot {
    pub fn new(root: &Path) -> Result<Chroot> {
        let root = root
            .canonicalize()
            .with_context(|| format!("image tree {}", root.display()))?;
        for d in ["proc", "sys", "dev", "run", "bin"] {
            if !root.join(d).exists() {
                bail!("{} is not a root tree (no /{d})", root.display());
            }
        }
        Ok(Chroot { root, epoch: None })
    }

    /// Commands inside see SOURCE_DATE_EPOCH=`epoch`.
    pub fn with_epoch(mut self, epoch: i64) -> Chroot {
        self.epoch = Some(epoch);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A command run inside the tree.
    pub fn command<I, S>(&self, argv: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let c = wrap_in_namespace(exec::cmd("/bin/sh", ["-c", ENTER, "stemforge-chroot"]))
            .arg(&self.root)
            .args(argv)
            .clear_env()
            .envs(ENV);
        match self.epoch {
            Some(e) => c.env("SOURCE_DATE_EPOCH", e.to_string()),
            None => c,
        }
    }

    /// Run `argv` inside the tree.
    pub fn run(&self, argv: &[&str]) -> Result<exec::Output> {
        self.command(argv).run()
    }

    /// Run a shell script inside the tree with `set -eu`.
    pub fn run_script(&self, name: &str, body: &str) -> Result<exec::Output> {
        let dir = self.root.join("tmp");
        let file = tempfile::Builder::new()
            .prefix("stemforge-")
            .suffix(".sh")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a script file in {}", dir.display()))?;
        std::fs::write(file.path(), body)
            .with_context(|| format!("writing {}", file.path().display()))?;
        let inside = format!(
            "/tmp/{}",
            file.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        self.command(["/bin/sh", "-eu", &inside])
            .env("STEMFORGE_SCRIPT", name)
            .run()
            .with_context(|| format!("script {name} failed"))
    }

    /// Keep package scripts from starting services (exit 101, "action
    /// forbidden", for invoke-rc.d and deb-systemd-invoke).
    pub fn deny_service_starts(&self) -> Result<()> {
        let p = self.root.join(POLICY_RC_D.trim_start_matches('/'));
        std::fs::write(
            &p,
            "#!/bin/sh\n# stemforge: no service starts while building\nexit 101\n",
        )
        .with_context(|| format!("writing {}", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", p.display()))
    }

    pub fn allow_service_starts(&self) -> Result<()> {
        let p = self.root.join(POLICY_RC_D.trim_start_matches('/'));
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
}

/// Run `inner` in fresh mount and PID namespaces that die with it.
pub fn wrap_in_namespace(inner: Cmd) -> Cmd {
    let mut c = exec::cmd(
        "unshare",
        [
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "--",
        ],
    )
    .arg(inner.program());
    for a in inner.arguments() {
        c = c.arg(a);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_namespaced() {
        let d = tempfile::tempdir().unwrap();
        for s in ["proc", "sys", "dev", "run", "bin"] {
            std::fs::create_dir(d.path().join(s)).unwrap();
        }
        let c = Chroot::new(d.path()).unwrap();
        let line = c.command(["apt-get", "update"]).display();
        assert!(
            line.starts_with(
                "unshare --mount --pid --fork --kill-child --propagation private -- /bin/sh -c"
            ),
            "{line}"
        );
        assert!(line.ends_with("apt-get update"), "{line}");
    }

    #[test]
    fn a_non_tree_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = Chroot::new(d.path()).unwrap_err();
        assert!(e.to_string().contains("not a root tree"), "{e}");
    }
}
