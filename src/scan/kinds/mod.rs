//! The check kinds: the scanner's vocabulary. Each kind says how it
//! evaluates offline (the files of a root tree) and live (the running
//! system), and always returns the evidence that decided.

pub mod accounts;
pub mod apparmor;
pub mod audit;
pub mod cmdline;
pub mod cron;
pub mod docker;
pub mod file;
pub mod firewall;
pub mod fswalk;
pub mod json;
pub mod kmod;
pub mod kv;
pub mod mount;
pub mod package;
pub mod pam;
pub mod path;
pub mod pg;
pub mod pghba;
pub mod service;
pub mod sockets;
pub mod sshd;
pub mod sysctl;
pub mod yaml;

#[cfg(test)]
mod tests {
    /// Every kind reads through the target: its view and its command
    /// runner. Tests may build trees with std::fs.
    #[test]
    fn kinds_read_only_through_the_target() {
        let sources = [
            ("accounts.rs", include_str!("accounts.rs")),
            ("apparmor.rs", include_str!("apparmor.rs")),
            ("audit.rs", include_str!("audit.rs")),
            ("cmdline.rs", include_str!("cmdline.rs")),
            ("cron.rs", include_str!("cron.rs")),
            ("docker.rs", include_str!("docker.rs")),
            ("file.rs", include_str!("file.rs")),
            ("firewall.rs", include_str!("firewall.rs")),
            ("fswalk.rs", include_str!("fswalk.rs")),
            ("json.rs", include_str!("json.rs")),
            ("kmod.rs", include_str!("kmod.rs")),
            ("kv.rs", include_str!("kv.rs")),
            ("mount.rs", include_str!("mount.rs")),
            ("package.rs", include_str!("package.rs")),
            ("pam.rs", include_str!("pam.rs")),
            ("path.rs", include_str!("path.rs")),
            ("pg.rs", include_str!("pg.rs")),
            ("pghba.rs", include_str!("pghba.rs")),
            ("service.rs", include_str!("service.rs")),
            ("sockets.rs", include_str!("sockets.rs")),
            ("sshd.rs", include_str!("sshd.rs")),
            ("sysctl.rs", include_str!("sysctl.rs")),
            ("yaml.rs", include_str!("yaml.rs")),
        ];
        let files: Vec<&str> = include_str!("mod.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub mod "))
            .map(|m| m.trim_end_matches(';'))
            .collect();
        assert_eq!(files.len(), sources.len(), "every kind is checked here");
        for (name, text) in sources {
            let code = text.split("#[cfg(test)]").next().unwrap();
            for banned in [
                "std::fs",
                "std::process",
                "exec::which",
                "exec::cmd",
                "File::open",
                "resolve(",
                "resolve_with(",
            ] {
                assert!(!code.contains(banned), "{name} uses {banned}");
            }
        }
    }
}
