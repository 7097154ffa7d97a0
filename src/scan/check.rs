//! A control's check: one kind, or `all`/`any` of several.

use super::kinds::{
    accounts::AccountsCheck, audit::AuditRuleCheck, file::FileCheck, fswalk::FsWalkCheck,
    kmod::KernelModuleCheck, kv::KvCheck, mount::MountCheck, package::PackageCheck,
    service::ServiceCheck, sshd::SshdCheck, sysctl::SysctlCheck,
};
use super::outcome::{Outcome, Status};
use super::target::Target;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    File(FileCheck),
    Kv(KvCheck),
    Sysctl(SysctlCheck),
    Sshd(SshdCheck),
    Mount(MountCheck),
    Package(PackageCheck),
    Service(ServiceCheck),
    KernelModule(KernelModuleCheck),
    AuditRule(AuditRuleCheck),
    FsWalk(FsWalkCheck),
    Accounts(AccountsCheck),
    /// Every check must pass.
    All(Vec<Check>),
    /// At least one check must pass.
    Any(Vec<Check>),
}

/// Checks are written as single-key maps (`file: {...}`), nested ones too.
pub fn deserialize_check<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
    serde_yaml::with::singleton_map_recursive::deserialize(d)
}

/// Parse a check from YAML text (tests, tools).
pub fn parse_check(text: &str) -> Result<Check, serde_yaml::Error> {
    deserialize_check(serde_yaml::Deserializer::from_str(text))
}

impl Check {
    /// The kind's name as written in stage files.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::File(_) => "file",
            Check::Kv(_) => "kv",
            Check::Sysctl(_) => "sysctl",
            Check::Sshd(_) => "sshd",
            Check::Mount(_) => "mount",
            Check::Package(_) => "package",
            Check::Service(_) => "service",
            Check::KernelModule(_) => "kernel_module",
            Check::AuditRule(_) => "audit_rule",
            Check::FsWalk(_) => "fs_walk",
            Check::Accounts(_) => "accounts",
            Check::All(_) => "all",
            Check::Any(_) => "any",
        }
    }

    /// Problems a loader reports (bad regex, relative path, empty test).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Check::File(c) => c.validate(),
            Check::Kv(c) => c.validate(),
            Check::Sysctl(c) => c.validate(),
            Check::Sshd(c) => c.validate(),
            Check::Mount(c) => c.validate(),
            Check::Package(c) => c.validate(),
            Check::Service(c) => c.validate(),
            Check::KernelModule(c) => c.validate(),
            Check::AuditRule(c) => c.validate(),
            Check::FsWalk(c) => c.validate(),
            Check::Accounts(c) => c.validate(),
            Check::All(cs) | Check::Any(cs) => {
                if cs.is_empty() {
                    return Err(format!("`{}` needs at least one check", self.kind()));
                }
                cs.iter().try_for_each(Check::validate)
            }
        }
    }

    /// What the check tests, in one line.
    pub fn describe(&self) -> String {
        match self {
            Check::File(c) => c.describe(),
            Check::Kv(c) => c.describe(),
            Check::Sysctl(c) => c.describe(),
            Check::Sshd(c) => c.describe(),
            Check::Mount(c) => c.describe(),
            Check::Package(c) => c.describe(),
            Check::Service(c) => c.describe(),
            Check::KernelModule(c) => c.describe(),
            Check::AuditRule(c) => c.describe(),
            Check::FsWalk(c) => c.describe(),
            Check::Accounts(c) => c.describe(),
            Check::All(cs) => cs
                .iter()
                .map(Check::describe)
                .collect::<Vec<_>>()
                .join(" AND "),
            Check::Any(cs) => cs
                .iter()
                .map(Check::describe)
                .collect::<Vec<_>>()
                .join(" OR "),
        }
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        match self {
            Check::File(c) => c.eval(t),
            Check::Kv(c) => c.eval(t),
            Check::Sysctl(c) => c.eval(t),
            Check::Sshd(c) => c.eval(t),
            Check::Mount(c) => c.eval(t),
            Check::Package(c) => c.eval(t),
            Check::Service(c) => c.eval(t),
            Check::KernelModule(c) => c.eval(t),
            Check::AuditRule(c) => c.eval(t),
            Check::FsWalk(c) => c.eval(t),
            Check::Accounts(c) => c.eval(t),
            Check::All(cs) => {
                let outs: Vec<Outcome> = cs.iter().map(|c| c.eval(t)).collect();
                let worst = [Status::Error, Status::Fail, Status::Pass]
                    .into_iter()
                    .find(|s| outs.iter().any(|o| o.status == *s))
                    .unwrap_or(Status::NotApplicable);
                Outcome::new(worst, outs.into_iter().flat_map(|o| o.evidence).collect())
            }
            Check::Any(cs) => {
                let outs: Vec<Outcome> = cs.iter().map(|c| c.eval(t)).collect();
                let status = if outs.iter().any(|o| o.status == Status::Pass) {
                    Status::Pass
                } else if outs.iter().any(|o| o.status == Status::Error) {
                    Status::Error
                } else if outs.iter().any(|o| o.status == Status::Fail) {
                    Status::Fail
                } else {
                    Status::NotApplicable
                };
                Outcome::new(status, outs.into_iter().flat_map(|o| o.evidence).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_is_rejected_with_the_known_ones() {
        let e = parse_check("{ sshdd: { X: y } }").unwrap_err().to_string();
        assert!(e.contains("unknown variant `sshdd`"), "{e}");
        assert!(e.contains("sshd"), "{e}");
    }

    #[test]
    fn combinators() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x").unwrap();
        let t = Target::root(d.path()).unwrap();
        let all: Check =
            parse_check("all: [ { file: { path: /a } }, { file: { path: /b } } ]").unwrap();
        all.validate().unwrap();
        assert_eq!(all.eval(&t).status, Status::Fail);
        let any: Check =
            parse_check("any: [ { file: { path: /a } }, { file: { path: /b } } ]").unwrap();
        assert_eq!(any.eval(&t).status, Status::Pass);
        let empty: Check = parse_check("all: []").unwrap();
        assert!(empty.validate().is_err());
    }
}
