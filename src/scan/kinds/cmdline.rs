//! `cmdline`: the kernel command line carries arguments (`audit=1`),
//! settings with values (`audit_backlog_limit` at least 8192) and not
//! others (`audit=0`). Offline: every `linux` line of the image's GRUB
//! configuration, so every menu entry boots with them. Live: the running
//! kernel's /proc/cmdline, and the GRUB configuration too, so the next
//! boot keeps them.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

pub const GRUB_CFG: &str = "/boot/grub/grub.cfg";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmdlineCheck {
    /// Arguments that must be present as written (`audit=1`, `nosmt`).
    #[serde(default)]
    pub args: Vec<String>,
    /// `name=value` arguments and what the value must be.
    #[serde(default, deserialize_with = "deserialize_expect_map")]
    pub settings: Vec<(String, Expect)>,
    /// Arguments that must not be present.
    #[serde(default)]
    pub absent: Vec<String>,
}

/// The arguments of each `linux` line of a GRUB configuration, with the
/// line number (the kernel image itself dropped).
pub fn grub_linux_lines(cfg: &str) -> Vec<(usize, Vec<String>)> {
    cfg.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let mut w = l.split_whitespace();
            match w.next() {
                Some("linux") | Some("linuxefi") | Some("linux16") => {
                    w.next(); // the kernel
                    Some((i + 1, w.map(str::to_string).collect()))
                }
                _ => None,
            }
        })
        .collect()
}

impl CmdlineCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.args.is_empty() && self.settings.is_empty() && self.absent.is_empty() {
            return Err("list `args`, `settings` or `absent`".into());
        }
        for (_, e) in &self.settings {
            e.validate()?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut p: Vec<String> = self.args.clone();
        p.extend(
            self.settings
                .iter()
                .map(|(k, e)| format!("{k} {}", e.describe())),
        );
        p.extend(self.absent.iter().map(|a| format!("no {a}")));
        format!("kernel command line: {}", p.join(", "))
    }

    /// Judge one command line, adding findings under the label `at`.
    fn judge(&self, at: &str, args: &[String], f: &mut Findings) {
        let mut bad = Vec::new();
        for a in &self.args {
            if !args.contains(a) {
                bad.push(format!("no {a}"));
            }
        }
        for (k, e) in &self.settings {
            // The kernel takes the last of repeated arguments.
            let v = args
                .iter()
                .rev()
                .find_map(|a| a.strip_prefix(&format!("{k}=")));
            if let Err(why) = e.test(v) {
                bad.push(format!("{k} {why}"));
            }
        }
        for a in &self.absent {
            if args.contains(a) {
                bad.push(format!("{a} present"));
            }
        }
        if bad.is_empty() {
            f.ok(format!("{at}: {}", args.join(" ")));
        } else {
            f.bad(format!("{at}: {}", bad.join(", ")));
        }
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let mut f = Findings::new();
        if t.is_live() {
            match t.read_to_string("/proc/cmdline") {
                Ok(text) => {
                    let args: Vec<String> = text.split_whitespace().map(str::to_string).collect();
                    self.judge("/proc/cmdline", &args, &mut f);
                }
                Err(e) => return Outcome::error(format!("/proc/cmdline: {e}")),
            }
        }
        let cfg = match t.read_optional(GRUB_CFG) {
            Ok(Some(c)) => c,
            Ok(None) => return Outcome::fail(format!("{GRUB_CFG} does not exist")),
            Err(e) => return Outcome::error(format!("{GRUB_CFG}: {e}")),
        };
        let lines = grub_linux_lines(&cfg);
        if lines.is_empty() {
            return Outcome::fail(format!("{GRUB_CFG} has no linux line"));
        }
        for (n, args) in lines {
            self.judge(&format!("{GRUB_CFG}:{n}"), &args, &mut f);
        }
        f.finish()
    }
}

crate::register_kind!("cmdline", CmdlineCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;

    #[test]
    fn every_linux_line_is_judged() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("boot/grub")).unwrap();
        let write = |cfg: &str| std::fs::write(d.path().join("boot/grub/grub.cfg"), cfg).unwrap();
        let c: CmdlineCheck = serde_yaml::from_str(
            "{ args: [audit=1], settings: { audit_backlog_limit: { min: 8192 } }, absent: [audit=0] }",
        )
        .unwrap();
        c.validate().unwrap();
        let eval = || c.eval(&Target::root(d.path()).unwrap());
        write(
            "menuentry 'Debian' {\n\tlinux /vmlinuz root=UUID=x ro audit=1 audit_backlog_limit=8192\n}\n\
             menuentry 'recovery' {\n\tlinux /vmlinuz root=UUID=x ro single audit=1 audit_backlog_limit=16384\n}\n",
        );
        assert_eq!(eval().status, Status::Pass, "{:?}", eval());
        // The recovery entry alone loses the setting: that is a failure.
        write(
            "menuentry 'Debian' {\n\tlinux /vmlinuz ro audit=1 audit_backlog_limit=8192\n}\n\
             menuentry 'recovery' {\n\tlinux /vmlinuz ro single audit=1 audit_backlog_limit=64 audit=0\n}\n",
        );
        let o = eval();
        assert_eq!(o.status, Status::Fail);
        let text = o.evidence.join("\n");
        assert!(text.contains("grub.cfg:5: audit_backlog_limit"), "{text}");
        assert!(text.contains("audit=0 present"), "{text}");
        write("set timeout=1\n");
        assert_eq!(eval().status, Status::Fail, "no linux line");
    }
}
