//! Server roles: what a profile's `roles:` may name, which roles exclude
//! each other, and the inputs a role takes from the user (`--role-input
//! NAME=FILE` or the profile's `role_inputs:`). Everything here is
//! checked in the plan, before any work starts; `apply_inputs` puts the
//! checked inputs into the tree after the stages ran.

pub mod docker;
pub mod k8s;
pub mod postgres;

use crate::config::ConfigError;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A role stemforge knows beyond its stages: conflicts and inputs.
pub struct RoleDef {
    pub name: &'static str,
    /// Roles an image cannot have together with this one, and why.
    pub conflicts: &'static [(&'static str, &'static str)],
    pub inputs: &'static [InputDef],
}

pub struct InputDef {
    /// `--role-input NAME=FILE`
    pub name: &'static str,
    pub kind: InputKind,
    pub help: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// An executable ELF file for x86-64.
    Executable,
    /// A JSON object merged over the role's own (its keys win).
    JsonObject,
    /// postgresql.conf settings, added after the role's own.
    PgConf,
}

pub const ROLES: &[RoleDef] = &[
    RoleDef {
        name: "docker",
        conflicts: &[(
            "k8s-node",
            "a Kubernetes node runs its pods through containerd's CRI; a Docker daemon beside the kubelet runs containers the cluster neither schedules nor sees",
        )],
        inputs: &[InputDef {
            name: "daemon.json",
            kind: InputKind::JsonObject,
            help: "keys merged over the hardened /etc/docker/daemon.json",
        }],
    },
    RoleDef {
        name: "postgres",
        conflicts: &[],
        inputs: &[InputDef {
            name: "postgresql.conf",
            kind: InputKind::PgConf,
            help: "settings installed as conf.d/90-site.conf, after the hardening",
        }],
    },
    RoleDef {
        name: "k8s-node",
        conflicts: &[(
            "docker",
            "a Kubernetes node runs its pods through containerd's CRI; a Docker daemon beside the kubelet runs containers the cluster neither schedules nor sees",
        )],
        inputs: &[InputDef {
            name: "kubelet",
            kind: InputKind::Executable,
            help: "the kubelet binary, installed as /usr/local/bin/kubelet",
        }],
    },
];

pub fn def(name: &str) -> Option<&'static RoleDef> {
    ROLES.iter().find(|r| r.name == name)
}

/// A checked role input.
#[derive(Debug, Clone, Serialize)]
pub struct RoleInput {
    pub role: String,
    pub name: String,
    pub kind: InputKind,
    pub file: PathBuf,
    /// SHA-256 of the file: build manifests record it.
    pub sha256: String,
}

/// Where an input was named: the flag, or a profile file and its text.
pub enum Origin<'a> {
    Flag,
    Profile(&'a Path, &'a str),
}

impl Origin<'_> {
    fn error(&self, name: &str, msg: String) -> ConfigError {
        match self {
            Origin::Flag => ConfigError::new("--role-input", msg),
            Origin::Profile(path, text) => ConfigError::at(
                *path,
                text,
                format!("role_inputs.{name}"),
                &format!(r#"^\s*"?{}"?\s*:"#, regex::escape(name)),
                msg,
            ),
        }
    }
}

/// Two roles of `roles` that exclude each other, with the reason.
pub fn conflict(roles: &[String]) -> Option<(String, String, &'static str)> {
    for r in roles {
        let Some(d) = def(r) else { continue };
        for (other, why) in d.conflicts {
            if roles.iter().any(|x| x == other) {
                return Some((r.clone(), other.to_string(), why));
            }
        }
    }
    None
}

/// Check one input named `name` with file `file` for an image with
/// `roles`.
pub fn check_input(
    roles: &[String],
    name: &str,
    file: &Path,
    origin: &Origin,
) -> Result<RoleInput, ConfigError> {
    let found = roles
        .iter()
        .filter_map(|r| def(r).map(|d| (r, d)))
        .find_map(|(r, d)| d.inputs.iter().find(|i| i.name == name).map(|i| (r, i)));
    let Some((role, input)) = found else {
        let known: Vec<String> = roles
            .iter()
            .filter_map(|r| def(r))
            .flat_map(|d| {
                d.inputs
                    .iter()
                    .map(move |i| format!("{} ({})", i.name, d.name))
            })
            .collect();
        return Err(origin.error(
            name,
            format!(
                "`{name}` is no input of this image's roles [{}]; they take: {}",
                roles.join(", "),
                if known.is_empty() {
                    "nothing".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ));
    };
    let bytes =
        std::fs::read(file).map_err(|e| origin.error(name, format!("{}: {e}", file.display())))?;
    let bad = |why: String| origin.error(name, format!("{}: {why}", file.display()));
    match input.kind {
        InputKind::Executable => {
            use std::os::unix::fs::PermissionsExt;
            let md = std::fs::metadata(file).map_err(|e| bad(e.to_string()))?;
            if !md.is_file() || md.permissions().mode() & 0o111 == 0 {
                return Err(bad("not an executable file (no x bit)".into()));
            }
            // ELF magic, 64-bit class, x86-64 machine (e_machine 62).
            let elf = bytes.len() > 20
                && bytes.starts_with(b"\x7fELF")
                && bytes[4] == 2
                && u16::from_le_bytes([bytes[18], bytes[19]]) == 62;
            if !elf {
                return Err(bad("not an x86-64 ELF executable".into()));
            }
        }
        InputKind::JsonObject => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                origin.error(
                    name,
                    format!(
                        "{}:{}:{}: not valid JSON: {e}",
                        file.display(),
                        e.line(),
                        e.column()
                    ),
                )
            })?;
            if !v.is_object() {
                return Err(bad("must hold a JSON object".into()));
            }
        }
        InputKind::PgConf => {
            let text =
                String::from_utf8(bytes.clone()).map_err(|_| bad("not UTF-8 text".into()))?;
            crate::scan::kinds::pg::parse_conf(&text).map_err(|(line, why)| {
                origin.error(name, format!("{}:{line}: {why}", file.display()))
            })?;
        }
    }
    Ok(RoleInput {
        role: role.clone(),
        name: name.to_string(),
        kind: input.kind,
        file: file.to_path_buf(),
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
    })
}

/// Put the inputs into the tree at `root` (after the stages).
pub fn apply_inputs(root: &Path, inputs: &[RoleInput]) -> Result<()> {
    let t = crate::scan::target::Target::root(root)?;
    for i in inputs {
        let bytes =
            std::fs::read(&i.file).with_context(|| format!("reading {}", i.file.display()))?;
        match i.kind {
            InputKind::Executable => {
                let (dest, _) = crate::osimage::place_file(&t, "/usr/local/bin/kubelet", &bytes)?;
                set_mode(&dest, 0o755)?;
            }
            InputKind::JsonObject => {
                let path = "/etc/docker/daemon.json";
                let mut base: serde_json::Value = serde_json::from_str(&t.read_to_string(path)?)
                    .with_context(|| format!("{path} of the role"))?;
                let over: serde_json::Value = serde_json::from_slice(&bytes)?;
                if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
                    for (k, v) in o {
                        b.insert(k.clone(), v.clone());
                    }
                }
                let text = serde_json::to_string_pretty(&base)? + "\n";
                let (dest, _) = crate::osimage::place_file(&t, path, text.as_bytes())?;
                set_mode(&dest, 0o644)?;
            }
            InputKind::PgConf => {
                let clusters = t.glob("/etc/postgresql/*/*/conf.d")?;
                if clusters.is_empty() {
                    anyhow::bail!("postgresql.conf input: the tree has no cluster configuration");
                }
                for dir in clusters {
                    let (dest, _) =
                        crate::osimage::place_file(&t, &format!("{dir}/90-site.conf"), &bytes)?;
                    set_mode(&dest, 0o640)?;
                    let owner = std::fs::metadata(t.resolve_with(&dir, true)?)?;
                    use std::os::unix::fs::MetadataExt;
                    std::os::unix::fs::chown(&dest, Some(owner.uid()), Some(owner.gid()))
                        .with_context(|| format!("chown {}", dest.display()))?;
                }
            }
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, p.display()))
}

/// The inputs of a profile and the command line, checked. The command
/// line's win over the profile's of the same name.
pub fn check_all(
    roles: &[String],
    from_profile: &BTreeMap<String, (PathBuf, PathBuf)>,
    from_flags: &[(String, PathBuf)],
) -> Result<Vec<RoleInput>, ConfigError> {
    let mut out: BTreeMap<String, RoleInput> = BTreeMap::new();
    for (name, (file, profile)) in from_profile {
        let text = std::fs::read_to_string(profile).unwrap_or_default();
        let i = check_input(roles, name, file, &Origin::Profile(profile, &text))?;
        out.insert(name.clone(), i);
    }
    for (name, file) in from_flags {
        out.insert(name.clone(), check_input(roles, name, file, &Origin::Flag)?);
    }
    Ok(out.into_values().collect())
}

/// `NAME=FILE` of `--role-input`.
pub fn parse_flag(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, f)) if !n.is_empty() && !f.is_empty() => Ok((n.to_string(), PathBuf::from(f))),
        _ => Err(format!(
            "`{s}`: write NAME=FILE (for example kubelet=./kubelet)"
        )),
    }
}

/// One live proof of a role, run by the verification agent in the
/// booted image after its scan.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Proof {
    pub role: String,
    pub name: String,
    pub passed: bool,
    pub evidence: Vec<String>,
    /// Why it could not run (an optional role input left out); such a
    /// proof neither passes nor fails the verification, and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl Proof {
    pub fn new(role: &str, name: &str) -> Proof {
        Proof {
            role: role.into(),
            name: name.into(),
            passed: true,
            evidence: Vec::new(),
            skipped: None,
        }
    }
    /// Record a step: its outcome and what showed it.
    pub fn step(&mut self, ok: bool, what: impl Into<String>) -> bool {
        let what = what.into();
        self.evidence
            .push(format!("{} {what}", if ok { "ok:" } else { "FAILED:" }));
        self.passed &= ok;
        ok
    }
}

/// Scans the live system again for some controls (by id).
pub type Rescan<'a> = &'a dyn Fn(&[&str]) -> crate::scan::Report;

/// The live proofs of the roles this image has (`roles` from its record).
pub fn prove_live(roles: &[String], rescan: Rescan) -> Vec<Proof> {
    let mut out = Vec::new();
    if roles.iter().any(|r| r == "docker") {
        out.extend(docker::prove(rescan));
    }
    if roles.iter().any(|r| r == "postgres") {
        out.extend(postgres::prove());
    }
    if roles.iter().any(|r| r == "k8s-node") {
        out.push(k8s::prove());
    }
    out
}

/// Run a command; its stdout, or the runner's error (the command line
/// with its stderr tail).
fn run(program: &str, args: &[&str]) -> std::result::Result<String, String> {
    crate::exec::cmd(program, args)
        .timeout(std::time::Duration::from_secs(120))
        .read()
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{e:#}"))
}
