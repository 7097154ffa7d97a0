//! `kernel_module`: a module cannot be loaded. It passes when modprobe.d
//! replaces its loading with `/bin/false` (or `true`), or when no installed
//! kernel ships it at all. Live, it must also not be loaded now.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const MODPROBE_DIRS: &[&str] = &[
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/lib/modprobe.d",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelModuleCheck {
    pub names: Vec<String>,
    /// Must be true: the modules cannot be loaded.
    pub disabled: bool,
}

fn norm(m: &str) -> String {
    m.replace('-', "_")
}

/// modprobe.d directives: module → (install command, origin), blacklists.
#[derive(Debug, Default)]
pub struct ModprobeConfig {
    pub install: BTreeMap<String, (String, String)>,
    pub blacklist: BTreeMap<String, String>,
}

pub fn modprobe_config(t: &Target) -> std::io::Result<ModprobeConfig> {
    let files = t.config_files(MODPROBE_DIRS, ".conf")?;
    let mut cfg = ModprobeConfig::default();
    for file in &files {
        let Some(text) = t.read_optional(file)? else {
            continue;
        };
        for (i, l) in text.lines().enumerate() {
            let w: Vec<&str> = l.split_whitespace().collect();
            let origin = format!("{file}:{}", i + 1);
            match w.as_slice() {
                ["install", m, cmd @ ..] if !cmd.is_empty() => {
                    // The first install line for a module is the one modprobe uses.
                    cfg.install
                        .entry(norm(m))
                        .or_insert_with(|| (cmd.join(" "), origin));
                }
                ["blacklist", m] => {
                    cfg.blacklist.entry(norm(m)).or_insert(origin);
                }
                _ => {}
            }
        }
    }
    Ok(cfg)
}

/// Whether an install command refuses the load.
fn refuses(cmd: &str) -> bool {
    let first = cmd.split_whitespace().next().unwrap_or("");
    matches!(
        first,
        "/bin/false" | "/usr/bin/false" | "/bin/true" | "/usr/bin/true" | "false" | "true"
    )
}

/// Modules shipped by the kernels in the tree: (loadable, built-in).
fn shipped(t: &Target) -> std::io::Result<(Vec<String>, Vec<String>, usize)> {
    let mut loadable = Vec::new();
    let mut builtin = Vec::new();
    let kernels = t.list_dir("/lib/modules")?;
    for k in &kernels {
        // Without modules.dep the kernel's modules are unknown: an error,
        // not "none shipped".
        let dep = t.read_to_string(&format!("/lib/modules/{k}/modules.dep"))?;
        for l in dep.lines() {
            if let Some((path, _)) = l.split_once(':') {
                loadable.push(module_of(path));
            }
        }
        if let Some(b) = t.read_optional(&format!("/lib/modules/{k}/modules.builtin"))? {
            builtin.extend(b.lines().map(module_of));
        }
    }
    Ok((loadable, builtin, kernels.len()))
}

fn module_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    norm(file.split('.').next().unwrap_or(file))
}

impl KernelModuleCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !self.disabled {
            return Err("only `disabled: true` is supported".into());
        }
        if self.names.is_empty() {
            return Err("list the modules under `names`".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!("kernel modules cannot load: {}", self.names.join(", "))
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let cfg = match modprobe_config(t) {
            Ok(c) => c,
            Err(e) => return Outcome::error(format!("reading modprobe.d: {e}")),
        };
        let (loadable, builtin, kernels) = match shipped(t) {
            Ok(s) => s,
            Err(e) => return Outcome::error(format!("reading /lib/modules: {e}")),
        };
        let loaded = if t.is_live() {
            match t.read_to_string("/proc/modules") {
                Ok(text) => text,
                Err(e) => return Outcome::error(format!("reading /proc/modules: {e}")),
            }
        } else {
            String::new()
        };
        let mut f = Findings::new();
        for name in &self.names {
            let m = norm(name);
            if builtin.contains(&m) {
                f.bad(format!(
                    "{name}: built into the kernel; it cannot be disabled"
                ));
                continue;
            }
            match cfg.install.get(&m) {
                Some((cmd, origin)) if refuses(cmd) => {
                    f.ok(format!("{origin}: install {name} {cmd}"))
                }
                Some((cmd, origin)) => f.bad(format!(
                    "{origin}: install {name} {cmd} (does not refuse the load)"
                )),
                None if kernels > 0 && !loadable.contains(&m) => {
                    f.ok(format!("{name}: not shipped by any installed kernel"))
                }
                // Nothing says whether it could load: not a pass.
                None if kernels == 0 => f.err(format!(
                    "{name}: no kernel in /lib/modules and no `install {name} /bin/false`: cannot tell"
                )),
                None => {
                    let bl = cfg
                        .blacklist
                        .get(&m)
                        .map(|o| {
                            format!(" (only blacklisted at {o}, which still allows explicit loads)")
                        })
                        .unwrap_or_default();
                    f.bad(format!(
                        "{name}: can be loaded: no `install {name} /bin/false`{bl}"
                    ))
                }
            }
            if loaded
                .lines()
                .any(|l| l.split_whitespace().next() == Some(m.as_str()))
            {
                f.bad(format!("{name}: loaded now (/proc/modules)"));
            }
        }
        f.finish()
    }
}

crate::register_kind!("kernel_module", KernelModuleCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc/modprobe.d")).unwrap();
        fs::create_dir_all(r.join("lib/modules/6.1.0-50-amd64")).unwrap();
        fs::write(
            r.join("lib/modules/6.1.0-50-amd64/modules.dep"),
            "kernel/fs/cramfs/cramfs.ko.xz:\nkernel/net/sctp/sctp.ko.xz: kernel/lib/libcrc32c.ko.xz\nkernel/drivers/usb/storage/usb-storage.ko.xz: kernel/drivers/usb/core/usbcore.ko.xz\n",
        )
        .unwrap();
        fs::write(
            r.join("lib/modules/6.1.0-50-amd64/modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        {
            let t = Target::root(r).unwrap();
            (d, t)
        }
    }

    fn chk(names: &[&str]) -> KernelModuleCheck {
        KernelModuleCheck {
            names: names.iter().map(|s| s.to_string()).collect(),
            disabled: true,
        }
    }

    #[test]
    fn install_false_disables_blacklist_alone_does_not() {
        let (d, t) = tree();
        fs::write(d.path().join("etc/modprobe.d/a.conf"), "blacklist cramfs\n").unwrap();
        let o = chk(&["cramfs"]).eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("only blacklisted"), "{o:?}");
        fs::write(
            d.path().join("etc/modprobe.d/a.conf"),
            "install cramfs /bin/false\nblacklist cramfs\ninstall usb_storage /bin/false\n",
        )
        .unwrap();
        assert_eq!(
            chk(&["cramfs", "usb-storage"]).eval(&t).status,
            Status::Pass
        );
    }

    #[test]
    fn unshipped_passes_builtin_fails() {
        let (_d, t) = tree();
        assert_eq!(chk(&["freevxfs"]).eval(&t).status, Status::Pass);
        assert_eq!(chk(&["ext4"]).eval(&t).status, Status::Fail);
        assert_eq!(chk(&["sctp"]).eval(&t).status, Status::Fail);
    }

    #[test]
    fn a_tree_without_a_kernel_cannot_pass_on_absence() {
        let (d, t) = tree();
        fs::remove_dir_all(d.path().join("lib/modules/6.1.0-50-amd64")).unwrap();
        let o = chk(&["cramfs"]).eval(&t);
        assert_eq!(o.status, Status::Error, "{o:?}");
        // The refusal in modprobe.d holds whatever kernel comes.
        fs::write(
            d.path().join("etc/modprobe.d/a.conf"),
            "install cramfs /bin/false
",
        )
        .unwrap();
        assert_eq!(chk(&["cramfs"]).eval(&t).status, Status::Pass);
        // A kernel without modules.dep: its modules are unknown.
        fs::create_dir_all(d.path().join("lib/modules/6.1.0-51-amd64")).unwrap();
        assert_eq!(chk(&["sctp"]).eval(&t).status, Status::Error);
    }
}
